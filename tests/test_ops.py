"""The forward / backward ops of every backend, called directly, against the float64
reference: one file for all backends (tests/_backends.py lists them).

``be = resolve_backend(name, device)``; ``be.fwd(x, w, labels, index, bias, *scalars)`` and
``be.bwd(...)`` with the schemas of arcface_kernels/_ops.py. Oracles: the reference's
``reference_forward`` and its closed-form ``reference_backward``, and for the backward also
plain autograd through ``reference_logits`` (which checks the closed form itself).

Covered for every backend: registration (schema, status), opcheck, every margin mode in
float64 and float32, Partial FC index (K = 1, 3; normalized or not), rows without a
target here, empty shards, class blocks with a partial last one, extreme inputs (targets
at c = +-1, zero / tiny / huge norms), NaN propagation and bad input. Sizes are small:
the triton backend runs in Triton's interpreter on the CPU. The CUDA variants are marked
``gpu`` and skip without a GPU.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels.testing import MARGIN_GRID
from arcface_kernels._config import MarginConfig
from arcface_kernels._ops import BWD_SCHEMA, FWD_SCHEMA, NAMESPACE, acc_dtype
from arcface_kernels.backends import resolve_backend
from arcface_kernels.reference import (NORM_EPS, margin_dpsi, margin_psi,
                                       reference_backward, reference_cosines,
                                       reference_forward, reference_logits)

from _backends import cpu_backends, cuda_backends
from _cases import max_rel_err

CPU_BACKENDS = cpu_backends()
PARAMS = ([pytest.param("cpu", b, id=b) for b in CPU_BACKENDS]
          + [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu)
             for b in cuda_backends()])
on_backends = pytest.mark.parametrize("device, backend", PARAMS)

F64, F32 = torch.float64, torch.float32
DTYPES = pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
# relative to the largest magnitude of each quantity (max_rel_err): forward statistics,
# gradients (s = 64 amplifies the rounding of float32 cosines ~64-fold)
TOL_FWD = {F64: 1e-12, F32: 2e-4}
TOL_BWD = {F64: 1e-10, F32: 2e-4}
# the argmax may differ from the reference's only between classes this close in cosine
TIE = {F64: 1e-12, F32: 1e-5}

# Margin settings of the ops: those of the one grid (arcface_kernels.testing.MARGIN_GRID)
# without smoothing and reductions, which are not op arguments (g_s != 0 below is what
# smoothing feeds the backward). "arcface" is the grid's s = 64 ArcFace case.
_OP_KEYS = ("s", "m1", "m2", "m3", "margin_mode", "target_grad", "normalize", "sub_centers")
OP_MODES = {("arcface" if c.name == "arcface_s64" else c.name):
            MarginConfig(**{k: v for k, v in c.settings.items() if k in _OP_KEYS})
            for c in MARGIN_GRID if c.name in (
                "arcface_s64", "cosface", "sphereface", "combined_m1", "easy",
                "big_margin_fallback", "straight_through", "linear_cosface", "sub_centers")}


# ------------------------------------------------------------------------------ helpers
def _backend(device: str, backend: str, dtype=F64):
    if device == "cuda" and backend == "cpp" and dtype == F64:
        pytest.skip("the cpp backend's CUDA kernels take float32 / 16-bit inputs "
                    "(test_cpp.py checks the error)")
    return resolve_backend(backend, torch.device(device))


def _scalars(cfg: MarginConfig, grad_filter: float = 0.0, block: int = 0) -> tuple:
    return cfg.op_args() + (grad_filter, block)


def _make(n: int, c: int, d: int, *, k: int = 1, index: Optional[torch.Tensor] = None,
          seed: int = 0, no_target_every: int = 4):
    """(x [n, d], w [c*k, d], labels [n]) in float64. labels are positions in the shard
    (index, or all c classes), -1 on every ``no_target_every``-th row; the embeddings lean
    toward their target class so that the targets span the whole range of cosines."""
    g = torch.Generator().manual_seed(seed)
    shard = c if index is None else index.numel()
    w = torch.randn(c * k, d, generator=g, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64)
    labels = torch.randint(0, max(shard, 1), (n,), generator=g)
    if shard:
        cls = labels if index is None else index[labels]
        lean = torch.linspace(-2.0, 3.0, n, dtype=F64).unsqueeze(1)
        x = x + lean * w.view(c, k, d)[cls, 0] / w.norm(dim=1).mean()
    if no_target_every:
        labels[1::no_target_every] = -1
    if shard == 0:
        labels[:] = -1
    return x, w, labels


def _coeffs(n: int, seed: int = 1):
    """g_p > 0, g_t < 0 and g_s as a loss with label smoothing feeds the backward."""
    g = torch.Generator().manual_seed(seed)
    g_p = torch.rand(n, generator=g, dtype=F64) + 0.5
    g_t = -torch.rand(n, generator=g, dtype=F64) - 0.5
    g_s = torch.rand(n, generator=g, dtype=F64) * 0.1
    return g_p, g_t, g_s


def autograd_backward(x, w, labels, index, lse, g_p, g_t, g_s, cfg, bias=None):
    """The backward primitive by float64 autograd through the reference's materialized
    logits: dL/dz_ij = g_p_i exp(z_ij - lse_i) + g_t_i [j = label_i] + g_s_i. Returns
    (dx, dw) and, with a bias, dbias."""
    xr = x.detach().double().clone().requires_grad_(True)
    wr = w.detach().double().clone().requires_grad_(True)
    leaves = [xr, wr]
    br = None
    if bias is not None:
        br = bias.detach().double().clone().requires_grad_(True)
        leaves.append(br)
    z, _ = reference_logits(xr, wr, labels, index, cfg, br)
    if z.shape[1] == 0 or z.shape[0] == 0:
        return tuple(torch.zeros_like(t) for t in leaves)
    dz = g_p[:, None] * torch.exp(z.detach() - lse[:, None]) + g_s[:, None]
    has = labels >= 0
    dz[has, labels[has]] += g_t[has]
    return tuple(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(
        torch.autograd.grad(z, leaves, dz, allow_unused=True), leaves))


def oracle_backward(x, w, labels, index, lse, g_p, g_t, g_s, cfg, tol=1e-10, scale=None,
                    slack=None, bias=None):
    """(dx, dw, dbias) in float64 from reference_backward (closed form), after checking
    it against autograd_backward (compared as ``grad_errors`` does)."""
    args = (x.double(), w.double(), labels, index, lse.double(), g_p, g_t, g_s)
    b64 = None if bias is None else bias.double()
    dx, dw, db = reference_backward(*args, cfg, b64)
    auto = autograd_backward(*args, cfg, b64)
    err = grad_errors((dx, dw), auto[:2], scale, slack)
    if bias is not None:
        err = err + grad_errors((db,), auto[2:])
    assert max(err) <= tol, f"closed form != autograd: {err}"
    return dx, dw, db


def row_norms(x, w):
    """The rows' max(|v|, eps): dx_i |x_i| and dw_j |w_j| (the gradients with respect to
    the normalized vectors) have the same order in every row, however the norms differ."""
    return tuple(torch.linalg.vector_norm(t.double().cpu(), dim=1, keepdim=True)
                 .clamp(min=NORM_EPS) for t in (x, w))


def target_slack(x, w, labels, lse, g_p, g_t, g_s, cfg, eps):
    """Rounding floor of dx_i |x_i| and dw_j |w_j| (K = 1, no index), per row.

    A target at c = +-1 exactly has psi' at its SIN2_MIN floor, up to ~1e6: its
    G_t = s dL/dz psi' reaches ~1e7 and enters dx_i |x_i| = sum_j G_ij w_hat_j - r_i x_hat_i
    twice, cancelling exactly (w_hat_y = +-x_hat). The sum carrying it rounds at
    eps |G_t| whatever the order, so no backend (the reference included) can do better
    than that in the rows it touches: in float32 it is O(1)."""
    c = reference_cosines(x.double(), w.double(), None, cfg.normalize, 1)
    has = labels >= 0
    col = labels.clamp(min=0).unsqueeze(1)
    c_t = c.gather(1, col).squeeze(1)
    z_t = cfg.s * margin_psi(c_t, cfg.m1, cfg.m2, cfg.m3, cfg.wrap_code)
    g = cfg.s * (g_p * torch.exp(z_t - lse.double()) + g_s + g_t) \
        * margin_dpsi(c_t, cfg.m1, cfg.m2, cfg.wrap_code, cfg.grad_code)
    g = torch.where(has, g.abs(), torch.zeros_like(g)) * 4 * eps
    sw = torch.zeros(w.shape[0], dtype=F64).index_add_(0, labels.clamp(min=0), g)
    return g.unsqueeze(1), sw.unsqueeze(1)


def grad_errors(got, want, scale=None, slack=None):
    """max_rel_err of dx and dw (relative to the largest magnitude of each), their rows
    multiplied by ``scale`` (row_norms) and the error of each row reduced by ``slack``
    (target_slack), if given."""
    out = []
    for i, (g, r) in enumerate(zip(got, want)):
        g, r = g.double().cpu(), r.double().cpu()
        if g.numel() == 0:
            out.append(0.0)
            continue
        if scale is not None:
            g, r = g * scale[i], r * scale[i]
        diff = (g - r).abs()
        if slack is not None:
            diff = (diff - slack[i]).clamp(min=0)
        out.append(diff.max().item() / max(r.abs().max().item(), 1.0))
    return tuple(out)


def _check_argmax(arg, x, w, index, cfg, tie):
    """arg picks a class whose cosine is the row's max (up to ``tie``); where the best
    class leads the second by more than ``tie`` it must be the reference's."""
    c = reference_cosines(x.double(), w.double(), index, cfg.normalize, cfg.sub_centers)
    arg = arg.cpu()
    assert arg.dtype == torch.int64
    if c.shape[1] == 0:
        return
    top = c.max(dim=1).values
    picked = c.gather(1, arg.unsqueeze(1)).squeeze(1)
    assert (picked >= top - tie * top.abs().clamp(min=1)).all()
    if c.shape[1] > 1:
        two = c.topk(2, dim=1).values
        clear = (two[:, 0] - two[:, 1]) > tie * top.abs().clamp(min=1)
        assert torch.equal(arg[clear], c.argmax(dim=1)[clear])


def check_op(device, backend, x, w, labels, index, cfg, *, dtype=F64, block=0,
             scale_rows=False, bias=None):
    """Run fwd and bwd of ``backend`` on (x, w) cast to ``dtype`` and compare with the
    float64 oracles (on the inputs as rounded to ``dtype``). The backward gets the
    reference's lse (in the statistics dtype), so each op is checked on its own.
    ``scale_rows``: compare the gradients as test_extreme_inputs explains. Returns the
    backend's outputs."""
    be = _backend(device, backend, dtype)
    acc = acc_dtype(dtype)
    n = x.shape[0]
    xd, wd = x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)
    xq, wq = xd.double().cpu(), wd.double().cpu()   # what the backend sees, in float64
    ld = labels.to(device)
    idx = None if index is None else index.to(device)
    args = _scalars(cfg, 0.0, block)
    bd = None if bias is None else bias.to(device=device, dtype=dtype)
    got = be.fwd(xd, wd, ld, idx, bd, *args)
    bq = None if bd is None else bd.double().cpu()
    want = reference_forward(xq, wq, labels, index, cfg, bq)
    tol_fwd, tol_bwd = TOL_FWD[dtype], TOL_BWD[dtype]
    for name, g, r in zip(("lse", "target", "sum_z", "max_z"), got[:4], want[:4]):
        assert g.shape == (n,) and g.dtype == acc, (name, g.shape, g.dtype)
        g, r = g.cpu().double(), r
        finite = torch.isfinite(r)
        assert torch.equal(finite, torch.isfinite(g)) and torch.equal(g[~finite], r[~finite]), \
            f"{name}: non-finite values differ: {g} vs {r}"
        err = max_rel_err(g[finite], r[finite])
        assert err <= tol_fwd, f"{backend} {name}: relative error {err:.2e} > {tol_fwd:.0e}"
    if bias is None and not cfg.softcap:
        _check_argmax(got[4], xq, wq, index, cfg, TIE[dtype])
    else:
        assert torch.equal(got[4].cpu(), want[4]), (got[4], want[4])
    g_p, g_t, g_s = _coeffs(n)
    lse = want[0].to(acc)
    scale = slack = slack64 = None
    if scale_rows:
        scale = row_norms(xq, wq)
        slack, slack64 = (target_slack(xq, wq, labels, lse, g_p, g_t, g_s, cfg,
                                       torch.finfo(t).eps) for t in (dtype, F64))
    rdx, rdw, rdb = oracle_backward(xq, wq, labels, index, lse, g_p, g_t, g_s, cfg,
                                    scale=scale, slack=slack64, bias=bq)
    dx, dw, db = be.bwd(xd, wd, ld, idx, bd, *(t.to(device=device, dtype=acc)
                                       for t in (lse, g_p, g_t, g_s)), *args)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert dw.shape == w.shape and dw.dtype == dtype
    errs = grad_errors((dx, dw), (rdx, rdw), scale, slack)
    if bias is None:
        assert db.shape == (0,) and db.dtype == dtype, (db.shape, db.dtype)
    else:
        assert db.shape == bias.shape and db.dtype == dtype, (db.shape, db.dtype)
        err = grad_errors((db,), (rdb,))[0]
        assert err <= tol_bwd, f"{backend} dbias: relative error {err:.2e} > {tol_bwd:.0e}"
    for name, g, err in zip(("dx", "dw"), (dx, dw), errs):
        assert torch.isfinite(g).all(), f"{backend} {name} has non-finite values"
        assert err <= tol_bwd, f"{backend} {name}: relative error {err:.2e} > {tol_bwd:.0e}"
    return got, (dx.cpu(), dw.cpu())


def _op(backend: str, kind: str):
    return getattr(getattr(torch.ops, NAMESPACE), f"{backend}_{kind}").default


# ----------------------------------------------------------------------- 1. registration
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_registration(backend, kind):
    """The op is torch.ops.arcface_kernels.<backend>_<kind> with exactly the shared schema
    (argument names, types, defaults, returns), and the backend reports ok."""
    assert ak.backend_status()[backend].startswith("ok"), ak.backend_status()[backend]
    be = resolve_backend(backend, torch.device("cpu"))
    op = _op(backend, kind)
    assert (be.fwd if kind == "fwd" else be.bwd) is op
    want = torch._C.parse_schema(f"{NAMESPACE}::{backend}_{kind}"
                                 + (FWD_SCHEMA if kind == "fwd" else BWD_SCHEMA))
    got = op._schema

    def sig(s):
        return ([(a.name, str(a.type), a.default_value, a.kwarg_only) for a in s.arguments],
                [(r.name, str(r.type)) for r in s.returns])

    assert sig(got) == sig(want)


_SYMINT = ("torch.library.triton_op infers the schema from the Python annotations and "
           "declares the int arguments wrap_mode, grad_mode, sub_centers and block as "
           "SymInt; the shared schema (and the other backends) say int. Its schema= "
           "argument is ignored (torch 2.13 always infers), so this cannot be fixed "
           "here; SymInt accepts every int, so callers see no difference.")


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.xfail(strict=True, reason=_SYMINT))
    if b == "triton" else b for b in CPU_BACKENDS])
def test_schema_text(backend, kind):
    """The registered schema prints exactly as the shared schema text."""
    want = f"{NAMESPACE}::{backend}_{kind}" + (FWD_SCHEMA if kind == "fwd" else BWD_SCHEMA)
    assert str(_op(backend, kind)._schema) == str(torch._C.parse_schema(want))


# -------------------------------------------------------------------------- 2. opcheck
@on_backends
def test_opcheck(device, backend):
    """torch.library.opcheck of fwd (plain, with inputs requiring grad, with an index and
    sub-centers) and bwd: schema, autograd registration, fake kernels and AOT dispatch."""
    be = _backend(device, backend, F32)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    if backend == "triton" and device == "cpu":
        # as test_triton.py did: under TRITON_INTERPRET=1 the triton ops cannot be traced
        # (the launcher raises "torch.compile / AOT tracing of the triton backend needs
        # a GPU"), so AOT dispatch is checked on a GPU only
        utils = utils[:3]
    cfg = MarginConfig(s=16.0, m2=0.3, sub_centers=2)
    index = torch.tensor([3, 0, 2])
    x, w, labels = _make(6, 4, 5, k=2, index=index, seed=2)
    x, w, labels, index = (t.to(device) for t in (x.float(), w.float(), labels, index))
    lab_all = torch.tensor([0, 3, -1, 1, 2, 0], device=device)
    scal = _scalars(cfg)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    v = torch.rand(6, device=device)
    bias = torch.randn(4, device=device)
    bg = bias.clone().requires_grad_(True)
    scal_t = _scalars(MarginConfig(s=16.0, m2=0.3, sub_centers=2, softcap=5.0,
                                   interclass_filtering_threshold=0.2))
    for op, a, sc in ((be.fwd, (x, w, lab_all, None, None), scal),
                      (be.fwd, (xg, wg, lab_all, None, None), scal),
                      (be.fwd, (xg, wg, labels, index, None), scal),
                      (be.fwd, (xg, wg, labels, index, bg), scal_t),
                      (be.bwd, (x, w, lab_all, None, None, v + 1.0, v, -v, 0.1 * v), scal),
                      (be.bwd, (x, w, labels, index, None, v + 1.0, v, -v, 0.1 * v), scal),
                      (be.bwd, (x, w, labels, index, bias, v + 1.0, v, -v, 0.1 * v),
                       scal_t)):
        res = torch.library.opcheck(op, (*a, *sc), test_utils=utils)
        assert set(res.values()) == {"SUCCESS"}, res


# ------------------------------------------------------- 3. every mode, float64 / float32
@on_backends
@DTYPES
@pytest.mark.parametrize("mode", list(OP_MODES))
def test_matches_reference(device, backend, dtype, mode):
    """lse, target, sum_z, max_z, argmax; dx and dw against the float64 oracles (rows
    with label -1 among them; g_s != 0)."""
    cfg = OP_MODES[mode]
    x, w, labels = _make(21, 45, 13, k=cfg.sub_centers, seed=3)
    check_op(device, backend, x, w, labels, None, cfg, dtype=dtype)


def test_closed_form_matches_autograd():
    """The reference's closed-form backward (the reference backend's bwd op) equals
    autograd through reference_logits in every mode, with an index and sub-centers."""
    index = torch.tensor([5, 1, 8, 1, 0, 3])
    for cfg in OP_MODES.values():
        for idx in (None, index):
            x, w, labels = _make(9, 10, 7, k=cfg.sub_centers, index=idx, seed=4)
            lse = reference_forward(x, w, labels, idx, cfg)[0]
            oracle_backward(x, w, labels, idx, lse, *_coeffs(9), cfg, tol=1e-12)


# ------------------------------------------------------------- 4. index, -1 rows, empty
@on_backends
@DTYPES
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "linear"])
@pytest.mark.parametrize("k", [1, 3])
def test_index(device, backend, dtype, normalize, k):
    """Partial FC: the shard's classes read through an index (shuffled, one class twice),
    labels as shard positions with -1 rows mixed in; dw is exactly 0 on the rows of w
    outside the shard and nonzero on those inside."""
    cfg = MarginConfig(s=16.0, m2=0.3 if normalize else 0.0, m3=0.1, normalize=normalize,
                       sub_centers=k)
    c, d = 23, 9
    index = torch.randperm(c, generator=torch.Generator().manual_seed(5))[:11]
    index[10] = index[3]     # Partial FC never repeats a class, but the math must hold
    x, w, labels = _make(19, c, d, k=k, index=index, seed=6)
    assert (labels == -1).any() and (labels >= 0).any()
    _, (_, dw) = check_op(device, backend, x, w, labels, index, cfg, dtype=dtype)
    inside = torch.zeros(c, dtype=torch.bool)
    inside[index] = True
    dw = dw.view(c, k, d)
    assert (dw[~inside] == 0).all()
    assert (dw[inside].abs().amax(dim=2) > 0).all()


@on_backends
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("empty", ["index", "w"])
def test_empty_shard(device, backend, k, empty):
    """A shard without classes (an index of length 0, or w with 0 rows): lse = max_z =
    -inf, target = sum_z = 0, argmax 0; dx and dw are 0."""
    be = _backend(device, backend)
    cfg = MarginConfig(sub_centers=k)
    x, w, _ = _make(6, 4, 5, k=k)
    if empty == "w":
        w, index = w[:0], None
    else:
        index = torch.zeros(0, dtype=torch.long)
    labels = torch.full((6,), -1, dtype=torch.long)
    want = reference_forward(x, w, labels, index, cfg)
    dev = [t if t is None else t.to(device) for t in (x, w, labels, index)]
    lse, tgt, sz, mz, am = be.fwd(*dev, None, *_scalars(cfg))
    assert torch.isneginf(lse).all() and torch.isneginf(mz).all()
    assert (tgt == 0).all() and (sz == 0).all() and (am == 0).all()
    for g, r in zip((lse, tgt, sz, mz, am), want):
        assert torch.equal(g.cpu(), r)
    one = torch.ones(6, dtype=F64, device=device)
    dx, dw, _ = be.bwd(*dev, None, lse, one, -one, one * 0.1, *_scalars(cfg))
    assert dx.shape == x.shape and dw.shape == w.shape
    assert (dx == 0).all() and (dw == 0).all()


# -------------------------------------------------------------- 5. partial last blocks
@on_backends
@pytest.mark.parametrize("block", [3, 8, 32, 100])
@pytest.mark.parametrize("case", ["k1", "k3_index"])
def test_blocks(device, backend, block, case):
    """The ``block`` argument (the API's chunk_size) with C = 43 (or a 37-class index):
    a partial last block for 3, 8 and 32, one block larger than C for 100."""
    k = 1 if case == "k1" else 3
    cfg = MarginConfig(s=64.0, m2=0.5, sub_centers=k)
    index = None
    if case == "k3_index":   # sub-centers and an index (dw index_added block by block)
        index = torch.randperm(43, generator=torch.Generator().manual_seed(8))[:37]
        index[30] = index[2]     # a class repeated across blocks
    x, w, labels = _make(9, 43, 8, k=k, index=index, seed=7)
    check_op(device, backend, x, w, labels, index, cfg, block=block)


# ------------------------------------------------------------------ 6. extreme inputs
EXTREME_MODES = {
    "m1=0.8,m2=0.3": MarginConfig(s=64.0, m1=0.8, m2=0.3),
    "m1=0.8,m2=0.3,none": MarginConfig(s=64.0, m1=0.8, m2=0.3, margin_mode="none"),
    "m1=1.35": MarginConfig(s=30.0, m1=1.35, m2=0.0),
    "m1=1.35,m2=0.2,none": MarginConfig(s=30.0, m1=1.35, m2=0.2, m3=0.1,
                                        margin_mode="none"),
    "arcface": MarginConfig(s=64.0, m2=0.5),
}


def _extreme_inputs(huge: float):
    """x [10, 6], w [7, 6], labels. Row 0 exactly parallel to its class centre, row 1
    exactly antiparallel (norms powers of two: the normalized vectors are exact, c = +-1
    exactly); row 2 zero, row 3 scaled by 1e-30 (both with a target); row 4's class
    centre is zero; row 5 and class 6 have norms ~``huge``; row 7 has no target."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 6, generator=g, dtype=F64)
    x = torch.randn(10, 6, generator=g, dtype=F64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1, 2, 6])
    w[0] = 0.0
    w[0, 0] = 4.0
    x[0] = 0.0
    x[0, 0] = 2.0
    w[1] = 0.0
    w[1, 1] = 0.5
    x[1] = 0.0
    x[1, 1] = -8.0
    x[2] = 0.0
    x[3] *= 1e-30
    w[4] = 0.0
    x[5] *= huge
    w[6] *= huge
    return x, w, labels


@on_backends
@DTYPES
@pytest.mark.parametrize("mode", list(EXTREME_MODES))
def test_extreme_inputs(device, backend, dtype, mode):
    """Targets at c = +1 and c = -1 (psi' at its SIN2_MIN floor for m1 != 1), zero rows of
    x and w, a 1e-30 row with a target, huge norms (1e30 in float64, 1e18 in float32):
    finite, and equal to the reference. The rows of dx / dw span 40 orders of magnitude
    (dx_i ~ 1 / max(|x_i|, eps)): they are compared times max(|x_i|, eps), resp.
    max(|w_j|, eps), which puts every row on the same scale; rows 0 and 1 (and their
    classes) within the rounding floor of target_slack on top of the tolerance."""
    cfg = EXTREME_MODES[mode]
    x, w, labels = _extreme_inputs(1e30 if dtype == F64 else 1e18)
    got, _ = check_op(device, backend, x, w, labels, None, cfg, dtype=dtype,
                      scale_rows=True)
    for t in got:
        assert torch.isfinite(t).all()


def _nan_inputs(dtype, device):
    """x [7, 5] with a NaN in row 2 (which has a target), w [9, 5] with a NaN in class 4,
    which the index [0, 2, 3, 5, 6, 8] leaves out."""
    index = torch.tensor([0, 2, 3, 5, 6, 8])
    x, w, labels = _make(7, 9, 5, index=index, seed=9)
    labels[2] = 1
    x[2, 1] = math.nan
    w[4, 3] = math.nan
    return (x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype),
            labels.to(device), index.to(device))


@on_backends
@DTYPES
def test_nan_propagates_to_affected_rows_only(device, backend, dtype):
    """NaN in row 2 of x: that row's lse, target, sum_z and dx are NaN, every other row of
    the forward and of dx equals the reference; dw is NaN on the shard's rows (every class
    sees row 2) and 0 outside it. A NaN in a row of w outside the index changes nothing;
    a NaN in a class centre of the shard makes every row's lse NaN."""
    be = _backend(device, backend, dtype)
    cfg = MarginConfig(s=64.0, m2=0.5)
    acc = acc_dtype(dtype)
    dev = _nan_inputs(dtype, device)
    xq, wq, labels, index = (t.cpu() for t in dev)
    xq, wq = xq.double(), wq.double()
    got = be.fwd(*dev, None, *_scalars(cfg))
    ok = torch.arange(7) != 2
    want = reference_forward(xq[ok], wq, labels[ok], index, cfg)
    for name, g, r in zip(("lse", "target", "sum_z"), got[:3], want[:3]):
        g = g.cpu()
        assert torch.isnan(g[2]), name
        assert max_rel_err(g[ok], r) <= TOL_FWD[dtype], name
    assert max_rel_err(got[3].cpu()[ok], want[3]) <= TOL_FWD[dtype]
    g_p, g_t, g_s = _coeffs(7)
    lse = torch.full((7,), math.nan, dtype=F64)
    lse[ok] = want[0].double()
    vecs = [t.to(device=device, dtype=acc) for t in (lse, g_p, g_t, g_s)]
    dx, dw, _ = be.bwd(*dev, None, *vecs, *_scalars(cfg))
    rdx, _, _ = reference_backward(xq[ok], wq, labels[ok], index, lse[ok], g_p[ok],
                                   g_t[ok], g_s[ok], cfg)
    dx, dw = dx.cpu(), dw.cpu()
    assert torch.isnan(dx[2]).all()
    assert max_rel_err(dx[ok], rdx) <= TOL_BWD[dtype]
    inside = torch.zeros(9, dtype=torch.bool)
    inside[index] = True
    assert torch.isnan(dw[inside]).all()
    assert (dw[~inside] == 0).all()
    # a NaN in a class centre of the shard reaches every row's logsumexp
    x2, w2 = dev[0].clone(), dev[1].clone()
    x2[2, 1] = 0.5
    w2[5, 0] = math.nan
    assert torch.isnan(be.fwd(x2, w2, *dev[2:], None, *_scalars(cfg))[0]).all()


@pytest.mark.parametrize("device, backend", PARAMS)
@DTYPES
def test_nan_max_z(device, backend, dtype):
    """max_z (s * the row's max cosine) of a row with a NaN in x is NaN."""
    be = _backend(device, backend, dtype)
    dev = _nan_inputs(dtype, device)
    max_z = be.fwd(*dev, None, *_scalars(MarginConfig()))[3].cpu()
    assert torch.isnan(max_z[2])
    assert torch.isfinite(max_z[torch.arange(7) != 2]).all()


# ------------------------------------------- 6b. bias, soft cap, interclass filtering
# (the LLM-head and insightface terms: docs/design.md section 1)
TERM_CASES = {
    "bias_linear": dict(cfg=dict(s=1.0, m2=0.0, normalize=False), bias=True),
    "softcap_linear": dict(cfg=dict(s=1.0, m2=0.0, normalize=False, softcap=4.0)),
    "bias_softcap_linear": dict(cfg=dict(s=1.0, m2=0.0, m3=0.5, normalize=False,
                                         softcap=3.0), bias=True),
    "interclass": dict(cfg=dict(s=64.0, m2=0.5, margin_mode="none",
                                target_grad="straight_through",
                                interclass_filtering_threshold=0.2)),
    "interclass_cosface_k2_index": dict(cfg=dict(s=32.0, m2=0.0, m3=0.35, sub_centers=2,
                                                 interclass_filtering_threshold=0.15),
                                        index=True),
    "all_terms_k2_index": dict(cfg=dict(s=16.0, m2=0.4, sub_centers=2, softcap=10.0,
                                        interclass_filtering_threshold=0.25),
                               bias=True, index=True),
}


@on_backends
@DTYPES
@pytest.mark.parametrize("case", list(TERM_CASES))
def test_terms(device, backend, dtype, case):
    """lse, target, sum_z, max_z, argmax, dx, dw and dbias with a bias, a soft cap and the
    interclass filter, against the float64 oracles (with an index: classes repeated,
    so dbias accumulates; rows without a target filter every class above the threshold)."""
    spec = TERM_CASES[case]
    cfg = MarginConfig(**spec["cfg"])
    k = cfg.sub_centers
    index = None
    if spec.get("index"):
        index = torch.tensor([7, 2, 9, 2, 0, 11, 4, 5, 1, 7, 3])
    x, w, labels = _make(13, 12, 9, k=k, index=index, seed=21)
    bias = None
    if spec.get("bias"):
        bias = torch.randn(12, generator=torch.Generator().manual_seed(5), dtype=F64)
    check_op(device, backend, x, w, labels, index, cfg, dtype=dtype, bias=bias)


def test_interclass_filters_something():
    """The interclass cases above drop some logits but not all (else they test nothing),
    and a dropped logit is exactly s * 0 + bias."""
    cfg = MarginConfig(**TERM_CASES["interclass"]["cfg"])
    x, w, labels = _make(13, 12, 9, seed=21)
    z, c = reference_logits(x, w, labels, None, cfg)
    is_t = torch.zeros_like(c, dtype=torch.bool)
    has = labels >= 0
    is_t[has, labels[has]] = True
    dropped = (c > 0.2) & ~is_t
    assert 0 < int(dropped.sum()) < int((~is_t).sum())
    assert (z[dropped] == 0).all()


# ----------------------------------------------------------------------- 7. bad input
def _bad_args(case: str):
    """(x, w, labels, index, sub_centers, row vectors) of a call that is wrong in one
    way (float32, N = 5, D = 4, 6 classes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g)
    w = torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 5, -1, 2, 3])
    index, k, bias = None, 1, None
    vec = {n: torch.rand(5, generator=g) for n in ("lse", "g_p", "g_t", "g_s")}
    if case == "x_dims":
        x = x.unsqueeze(2)
    elif case == "w_dims":
        w = w.reshape(-1)
    elif case == "labels_dims":
        labels = labels.unsqueeze(1)
    elif case == "x_int":
        x = x.int()
    elif case == "w_dtype":
        w = w.double()
    elif case == "labels_int32":
        labels = labels.int()
    elif case == "labels_length":
        labels = labels[:4]
    elif case == "d_mismatch":
        w = w[:, :3]
    elif case == "sub_centers":
        k = 4
    elif case == "index_int32":
        index = torch.tensor([0, 1, 2], dtype=torch.int32)
    elif case == "index_2d":
        index = torch.tensor([[0, 1], [2, 3]])
    elif case == "index_high":
        index = torch.tensor([0, 6, 2])
        labels = torch.tensor([0, 1, -1, 2, 0])
    elif case == "index_negative":
        index = torch.tensor([0, -1, 2])
        labels = torch.tensor([0, 1, -1, 2, 0])
    elif case == "labels_high":
        labels = torch.tensor([0, 6, -1, 2, 3])
    elif case == "labels_high_index":   # label 3 in a 3-class shard
        index = torch.tensor([4, 1, 2])
        labels = torch.tensor([0, 1, -1, 2, 3])
    elif case == "labels_low":
        labels = torch.tensor([0, 1, -2, 2, 3])
    elif case.startswith("short_"):
        vec[case[6:]] = vec[case[6:]][:4]
    elif case == "g_p_2d":
        vec["g_p"] = vec["g_p"].unsqueeze(1)
    elif case == "g_s_int":
        vec["g_s"] = vec["g_s"].long()
    elif case == "bias_length":
        bias = torch.zeros(5)
    elif case == "bias_2d":
        bias = torch.zeros(6, 1)
    elif case == "bias_dtype":
        bias = torch.zeros(6, dtype=torch.float64)
    elif case in ("softcap_negative", "softcap_inf", "interclass_negative"):
        pass   # a scalar: see _bad_scalars
    else:
        raise KeyError(case)
    return x, w, labels, index, k, vec, bias


def _bad_scalars(case: str, k: int) -> tuple:
    scal = list(_scalars(MarginConfig(sub_centers=k)))
    if case == "softcap_negative":
        scal[8] = -1.0
    elif case == "softcap_inf":
        scal[8] = math.inf
    elif case == "interclass_negative":
        scal[9] = -0.5
    return tuple(scal)


# (case, exception, regex of the message naming the argument, value check: on CUDA a
# device-side assert instead of an exception, so CPU only)
BAD_INPUT = [
    ("x_dims", ValueError, r"\bx must be 2-D", False),
    ("w_dims", ValueError, r"\bw must be (a )?2-D", False),
    ("labels_dims", ValueError, r"\blabels must be 1-D", False),
    ("x_int", TypeError, r"\bx must be float16/bfloat16/float32/float64", False),
    ("w_dtype", TypeError, r"\bw dtype must match x dtype", False),
    ("labels_int32", TypeError, r"\blabels must be int64", False),
    ("labels_length", ValueError, r"\blabels has 4 rows but x has 5", False),
    ("d_mismatch", ValueError, r"\bw has D=3 but x has D=4", False),
    ("sub_centers", ValueError, r"\bw has 6 rows, not a multiple of sub_centers=4", False),
    ("index_int32", TypeError, r"\bindex must be int64", False),
    ("index_2d", ValueError, r"\bindex must be 1-D", False),
    ("index_high", ValueError, r"\bindex .*\[0, 6\).*got values in \[0, 6\]", True),
    ("index_negative", ValueError, r"\bindex .*\[0, 6\).*got values in \[-1, 2\]", True),
    ("labels_high", ValueError, r"\blabels must be in \[-1, 6\).*got values in \[-1, 6\]",
     True),
    ("labels_high_index", ValueError, r"\blabels must be in \[-1, 3\)", True),
    ("labels_low", ValueError, r"\blabels must be in \[-1, 6\).*got values in \[-2, 3\]",
     True),
    ("bias_length", ValueError, r"\bbias must (have shape|be 1-D).*6", False),
    ("bias_2d", ValueError, r"\bbias must (have shape|be 1-D)", False),
    ("bias_dtype", TypeError, r"\bbias dtype must match", False),
    ("softcap_negative", ValueError, r"\bsoftcap must .*-1", False),
    ("softcap_inf", ValueError, r"\bsoftcap must .*inf", False),
    ("interclass_negative", ValueError, r"\binterclass.* must .*-0\.5", False),
]
BAD_ROW_VECTORS = [
    ("short_lse", ValueError, r"\blse must .*5"),
    ("short_g_p", ValueError, r"\bg_p must .*5"),
    ("short_g_t", ValueError, r"\bg_t must .*5"),
    ("short_g_s", ValueError, r"\bg_s must .*5"),
    ("g_p_2d", ValueError, r"\bg_p must "),
    ("g_s_int", TypeError, r"\bg_s must be floating"),
]


@on_backends
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("case, exc, match, value_check", BAD_INPUT,
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input(device, backend, kind, case, exc, match, value_check):
    """Every backend raises the same exception type, with a message naming the argument,
    from fwd and from bwd."""
    if value_check and device == "cuda":
        pytest.skip("on CUDA the value checks are device-side asserts (test_triton.py)")
    be = _backend(device, backend, F32)
    x, w, labels, index, k, vec, bias = _bad_args(case)
    dev = [t if t is None else t.to(device) for t in (x, w, labels, index)]
    bias = None if bias is None else bias.to(device)
    scal = _bad_scalars(case, k)
    with pytest.raises(exc, match=match):
        if kind == "fwd":
            be.fwd(*dev, bias, *scal)
        else:
            be.bwd(*dev, bias, *(v.to(device) for v in vec.values()), *scal)


@on_backends
@pytest.mark.parametrize("case, exc, match", BAD_ROW_VECTORS,
                         ids=[c[0] for c in BAD_ROW_VECTORS])
def test_bad_backward_row_vectors(device, backend, case, exc, match):
    be = _backend(device, backend, F32)
    x, w, labels, index, k, vec, _ = _bad_args(case)
    with pytest.raises(exc, match=match):
        be.bwd(x.to(device), w.to(device), labels.to(device), None, None,
               *(v.to(device) for v in vec.values()), *_scalars(MarginConfig()))


@on_backends
def test_grad_filter(device, backend):
    """grad_filter > 0: the forward ignores it (every backend); the backward of a backend
    without a filter (reference, cpp) raises NotImplementedError, the others accept it,
    and a filter below every softmax value gives the exact gradient."""
    be = _backend(device, backend)
    cfg = MarginConfig(s=8.0, m2=0.3)
    x, w, labels = _make(7, 11, 5, seed=10)
    dev = [t.to(device) for t in (x, w, labels)]
    exact = be.fwd(*dev, None, None, *_scalars(cfg))
    filt = be.fwd(*dev, None, None, *_scalars(cfg, grad_filter=0.5))
    for a, b in zip(exact, filt):
        assert torch.equal(a, b)
    vecs = [exact[0]] + [t.to(device) for t in _coeffs(7)]
    dx0, dw0, _ = be.bwd(*dev, None, None, *vecs, *_scalars(cfg))
    if backend in ("reference", "cpp"):
        with pytest.raises(NotImplementedError, match="gradient filter"):
            be.bwd(*dev, None, None, *vecs, *_scalars(cfg, grad_filter=1e-3))
        return
    # s = 8: every softmax value is above e^-16 / 11 > 1e-9
    dx, dw, _ = be.bwd(*dev, None, None, *vecs, *_scalars(cfg, grad_filter=1e-9))
    assert max_rel_err(dx, dx0) <= 1e-12 and max_rel_err(dw, dw0) <= 1e-12
    dx, dw, _ = be.bwd(*dev, None, None, *vecs, *_scalars(cfg, grad_filter=0.5))
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert dx.shape == x.shape and dw.shape == w.shape
