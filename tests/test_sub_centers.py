"""Sub-center ArcFace (K sub-centers per class) on every available CPU backend, through
arcface_loss and ArcFaceLoss, against a naive reference written here independently of
arcface_kernels.reference: normalize, matmul, max over the K sub-centers of each class,
margin on the target, F.cross_entropy, plain autograd (whose max sends the gradient to the
arg-max sub-center only)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import arcface_kernels as ak
from _backends import cpu_backends
from _cases import make_inputs, max_rel_err

IGNORE = -100


BACKENDS = cpu_backends()


def _dtypes(backend):
    # the Triton interpreter is slow and has no float64 path: float32 only
    return [torch.float32] if backend == "triton" else [torch.float64, torch.float32]


def naive_sub_center_loss(x, w, y, k, *, s=64.0, m2=0.5, m3=0.0, label_smoothing=0.0,
                          reduction="mean"):
    """The loss, the obvious way: [N, C*K] cosines -> max over K -> ArcFace/CosFace margin
    (ArcFace fallback past pi: c - m2 sin m2) -> cross-entropy over the rows not ignored."""
    n, c = x.shape[0], w.shape[0] // k
    cos_all = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    cos = cos_all.view(n, c, k).max(dim=2).values
    valid = y != IGNORE
    yv = y[valid]
    cv = cos[valid]
    ct = cv.gather(1, yv.unsqueeze(1)).squeeze(1)
    theta = torch.acos(ct)
    psi = torch.where(theta + m2 <= math.pi, torch.cos(theta + m2),
                      ct - m2 * math.sin(m2)) - m3
    onehot = F.one_hot(yv, c).to(cv.dtype)
    logits = s * (cv + onehot * (psi - ct).unsqueeze(1))
    loss = F.cross_entropy(logits, yv, label_smoothing=label_smoothing, reduction="sum")
    return loss / valid.sum() if reduction == "mean" else loss


CASES = {
    # name: (N, C, D, K, loss kwargs)
    "arcface_k3": (9, 13, 17, 3, dict(s=64.0, m2=0.5)),
    "cosface_k2": (33, 70, 24, 2, dict(s=64.0, m2=0.0, m3=0.35)),
    "smoothing_k2_sum": (33, 70, 24, 2, dict(s=32.0, m2=0.3, label_smoothing=0.1,
                                             reduction="sum")),
    "one_class_k4": (5, 1, 4, 4, dict(s=16.0, m2=0.5)),
}


def _naive(x, w, y, k, kw):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = naive_sub_center_loss(x, w, y, k, **kw)
    dx, dw = torch.autograd.grad(loss, (x, w))
    return loss.detach(), dx, dw


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-4


def _check(got, want, dtype, what):
    for name, g, r in zip(("loss", "dx", "dw"), got, want):
        assert g.shape == r.shape, f"{what} {name}: shape"
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite"
        err = max_rel_err(g, r)
        assert err <= _tol(dtype), f"{what} {name}: relative error {err:.3e}"


def _params():
    return [(b, case, dt) for b in BACKENDS for case in CASES for dt in _dtypes(b)]


@pytest.mark.parametrize("backend,case,dtype", _params())
def test_arcface_loss_sub_centers_match_naive(backend, case, dtype):
    n, c, d, k, kw = CASES[case]
    x, w, y = make_inputs(n, c, d, sub_centers=k, seed=2, ignore_index=IGNORE)
    want = _naive(x, w, y, k, kw)
    xb = x.to(dtype).requires_grad_(True)
    wb = w.to(dtype).requires_grad_(True)
    loss = ak.arcface_loss(xb, wb, y, backend=backend, sub_centers=k, ignore_index=IGNORE,
                           **kw)
    loss.backward()
    _check((loss.detach(), xb.grad, wb.grad), want, dtype, f"{backend} {case}")
    # the gradient reaches the arg-max sub-centers only: a sub-center that is the arg-max
    # for no row gets exactly zero
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    arg = cos.view(n, c, k).argmax(dim=2)                       # [N, C]
    used = torch.zeros(c * k, dtype=torch.bool)
    used[(torch.arange(c) * k + arg).reshape(-1)] = True
    assert (wb.grad[~used] == 0).all(), "gradient reached a sub-center that is never arg-max"


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_sub_centers_match_naive(backend):
    n, c, d, k, kw = CASES["arcface_k3"]
    dtype = _dtypes(backend)[0]
    x, w, y = make_inputs(n, c, d, sub_centers=k, seed=5, ignore_index=IGNORE)
    want = _naive(x, w, y, k, kw)
    mod = ak.ArcFaceLoss(d, c, s=kw["s"], m2=kw["m2"], sub_centers=k, backend=backend,
                         ignore_index=IGNORE, dtype=dtype)
    assert tuple(mod.weight.shape) == (c * k, d)
    with torch.no_grad():
        mod.weight.copy_(w)
    xb = x.to(dtype).requires_grad_(True)
    loss = mod(xb, y)
    loss.backward()
    _check((loss.detach(), xb.grad, mod.weight.grad), want, dtype, f"{backend} module")
    # top-1 prediction from the stats: the class of the largest sub-center cosine
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).view(n, c, k).amax(dim=2)
    assert torch.equal(mod.last_stats.prediction, cos.argmax(dim=1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_sub_centers_send_gradient_to_one(backend):
    """Two identical sub-centers: one gets the whole gradient, the other none, and their
    sum is the naive gradient's."""
    n, c, d, k = 6, 4, 5, 2
    dtype = _dtypes(backend)[0]
    x, w, y = make_inputs(n, c, d, sub_centers=k, seed=7, ignore_index=IGNORE)
    w.view(c, k, d)[:, 1] = w.view(c, k, d)[:, 0]
    _, _, want_dw = _naive(x, w, y, k, dict(s=16.0, m2=0.5))
    wb = w.to(dtype).requires_grad_(True)
    ak.arcface_loss(x.to(dtype), wb, y, backend=backend, sub_centers=k, s=16.0, m2=0.5,
                    ignore_index=IGNORE).backward()
    g = wb.grad.view(c, k, d)
    nonzero = (g != 0).any(dim=2)                                    # [C, K]
    assert (nonzero.sum(dim=1) <= 1).all(), "gradient split over tied sub-centers"
    assert max_rel_err(g.sum(dim=1), want_dw.view(c, k, d).sum(dim=1)) <= _tol(dtype)


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_partial_fc_sub_centers_match_naive(sample_rate):
    """PartialFC (single process) with K sub-centers; with sampling, the naive loss over
    the sampled classes (PartialFC.weight_index) and zero gradient elsewhere."""
    n, c, d, k, kw = 17, 30, 9, 3, dict(s=64.0, m2=0.5)
    x, w, y = make_inputs(n, c, d, sub_centers=k, seed=11, ignore_index=IGNORE)
    pfc = ak.PartialFC(d, c, sample_rate=sample_rate, sub_centers=k, backend="chunked",
                       ignore_index=IGNORE, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        pfc.weight.copy_(w)
    xb = x.clone().requires_grad_(True)
    loss = pfc(xb, y)
    loss.backward()
    ids = torch.arange(c) if pfc.weight_index is None else pfc.weight_index
    positives = torch.unique(y[y != IGNORE]).numel()
    assert ids.numel() == (c if sample_rate == 1.0 else max(pfc.num_sample, positives))
    assert sample_rate == 1.0 or ids.numel() < c, "sampling kept every class"
    rows = (ids.unsqueeze(1) * k + torch.arange(k)).reshape(-1)
    ys = torch.where(y != IGNORE, torch.searchsorted(ids, y.clamp(min=0)), y)
    assert torch.equal(ids[ys[y != IGNORE]], y[y != IGNORE]), "a positive was not sampled"
    want_loss, want_dx, want_dws = _naive(x, w[rows], ys, k, kw)
    want_dw = torch.zeros_like(w).index_add_(0, rows, want_dws)
    _check((loss.detach(), xb.grad, pfc.weight.grad), (want_loss, want_dx, want_dw),
           torch.float64, f"PartialFC sample_rate={sample_rate}")


def test_sub_centers_chunk_boundaries():
    """Chunks of 5 classes (K = 3: 15 rows) over 70 classes: sub-center groups never split
    across chunks."""
    n, c, d, k, kw = 33, 70, 24, 3, dict(s=64.0, m2=0.5)
    x, w, y = make_inputs(n, c, d, sub_centers=k, seed=9, ignore_index=IGNORE)
    want = _naive(x, w, y, k, kw)
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = ak.arcface_loss(xb, wb, y, backend="chunked", sub_centers=k, chunk_size=5,
                           ignore_index=IGNORE, **kw)
    loss.backward()
    _check((loss.detach(), xb.grad, wb.grad), want, torch.float64, "chunked chunk_size=5")


def test_reference_agrees_with_naive():
    n, c, d, k, kw = CASES["cosface_k2"]
    x, w, y = make_inputs(n, c, d, sub_centers=k, seed=3, ignore_index=IGNORE)
    want = _naive(x, w, y, k, kw)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = ak.reference_loss(xr, wr, y, sub_centers=k, ignore_index=IGNORE, **kw)
    loss.backward()
    _check((loss.detach(), xr.grad, wr.grad), want, torch.float64, "reference_loss")


def test_bad_sub_centers():
    x, w, y = make_inputs(4, 5, 3, sub_centers=2)
    with pytest.raises(ValueError, match="sub_centers must be >= 1, got 0"):
        ak.arcface_loss(x, w, y, sub_centers=0)
    with pytest.raises(TypeError, match="sub_centers must be an int"):
        ak.arcface_loss(x, w, y, sub_centers=1.5)
    with pytest.raises(ValueError, match="not a multiple of sub_centers=3"):
        ak.arcface_loss(x, w, y, sub_centers=3)
    with pytest.raises(ValueError, match="sub_centers must be >= 1"):
        ak.PartialFC(3, 5, sub_centers=0)
