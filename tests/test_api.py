"""The public API: argument checks, edge cases, the module, backend choice, and the ops'
registration (opcheck, torch.compile fullgraph)."""
import math

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels.backends import resolve_backend
from arcface_kernels.reference import reference_loss
from _backends import cpu_backends
from _cases import make_inputs, max_rel_err, run_loss


CPU_BACKENDS = cpu_backends()


def _inputs(n=6, c=5, d=4, dtype=torch.float32):
    return make_inputs(n, c, d, dtype=dtype, ignore_some=False)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", CPU_BACKENDS)
class TestBadInput:
    def test_label_dtype(self, backend):
        """Labels of any integer dtype give the int64 result; others are a TypeError."""
        x, w, y = _inputs()
        want = ak.arcface_loss(x, w, y, backend=backend)
        for dt in (torch.int32, torch.int16):
            assert torch.equal(ak.arcface_loss(x, w, y.to(dt), backend=backend), want)
        for bad in (y.float(), y >= 0):
            with pytest.raises(TypeError, match=r"labels must be an integer tensor.*torch\."):
                ak.arcface_loss(x, w, bad, backend=backend)

    def test_label_shape(self, backend):
        x, w, y = _inputs()
        with pytest.raises(ValueError, match=r"labels must be 1-D.*\(6, 1\)"):
            ak.arcface_loss(x, w, y[:, None], backend=backend)

    @pytest.mark.parametrize("bad", [5, 99, -1, -7])
    def test_labels_out_of_range(self, backend, bad):
        x, w, y = _inputs()
        y[3] = bad
        with pytest.raises(ValueError, match=rf"labels must be in \[0, 5\).*got {bad}"):
            ak.arcface_loss(x, w, y, backend=backend)

    def test_mismatched_n(self, backend):
        x, w, y = _inputs()
        with pytest.raises(ValueError, match=r"labels has 5 rows but embeddings has 6"):
            ak.arcface_loss(x, w, y[:5], backend=backend)

    def test_mismatched_d(self, backend):
        x, w, y = _inputs()
        with pytest.raises(ValueError, match=r"weight has D=3 but embeddings has D=4"):
            ak.arcface_loss(x, w[:, :3], y, backend=backend)

    def test_wrong_ranks(self, backend):
        x, w, y = _inputs()
        with pytest.raises(ValueError, match=r"embeddings must be 2-D.*\(6, 4, 1\)"):
            ak.arcface_loss(x[..., None], w, y, backend=backend)
        with pytest.raises(ValueError, match=r"weight must be 2-D.*\(20,\)"):
            ak.arcface_loss(x, w.reshape(-1), y, backend=backend)

    @pytest.mark.parametrize("m2", [-0.1, math.pi, 4.0, float("nan")])
    def test_bad_m2(self, backend, m2):
        x, w, y = _inputs()
        with pytest.raises(ValueError, match=r"m2 must be"):
            ak.arcface_loss(x, w, y, m2=m2, backend=backend)

    def test_bad_other_knobs(self, backend):
        x, w, y = _inputs()
        cases = [(dict(s=0.0), "s must be > 0, got 0.0"), (dict(m1=-1.0), "m1 must be > 0"),
                 (dict(reduction="avg"), "reduction must be one of .* got 'avg'"),
                 (dict(margin_mode="wrap"), "margin_mode must be one of .* got 'wrap'"),
                 (dict(target_grad="ste"), "target_grad must be one of .* got 'ste'"),
                 (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\], got 1.5"),
                 (dict(sub_centers=0), "sub_centers must be >= 1, got 0"),
                 (dict(sub_centers=2), "weight has 5 rows, not a multiple of sub_centers=2"),
                 (dict(chunk_size=0), "chunk_size must be a positive int or None, got 0"),
                 (dict(normalize=False, m2=0.5), "normalize=False .* m2 must be 0")]
        for kwargs, msg in cases:
            with pytest.raises(ValueError, match=msg):
                ak.arcface_loss(x, w, y, **{"backend": backend, **kwargs})

    def test_dtype_mismatch(self, backend):
        x, w, y = _inputs()
        with pytest.raises(TypeError, match=r"weight dtype must match.*torch.float64"):
            ak.arcface_loss(x, w.double(), y, backend=backend)
        with pytest.raises(TypeError, match=r"embeddings must be float.*torch.int64"):
            ak.arcface_loss(x.long(), w.long(), y, backend=backend)


def test_unknown_backend_lists_available():
    x, w, y = _inputs()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \[.*chunked.*\], "
                                         r"got 'cudnn'"):
        ak.arcface_loss(x, w, y, backend="cudnn")


def test_auto_on_cpu_is_native_or_chunked():
    name = resolve_backend("auto", torch.device("cpu")).name
    assert name == ("cpp" if "cpp" in ak.available_backends() else "chunked")


# ---------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", CPU_BACKENDS)
class TestEdgeCases:
    def test_zero_norm_rows_and_columns(self, backend):
        x, w, y = make_inputs(6, 5, 4, ignore_some=False)
        x[2] = 0.0
        w[1] = 0.0
        want = run_loss(None, x, w, y, dict(s=16.0, m2=0.5))
        got = run_loss(backend, x, w, y, dict(s=16.0, m2=0.5))
        for g, r in zip(got, want):
            assert torch.isfinite(g).all()
            assert max_rel_err(g, r) < 1e-10

    def test_non_contiguous_inputs(self, backend):
        x, w, y = make_inputs(8, 6, 10, ignore_some=False)
        xs = x.T.contiguous().T[::2]            # column-major and strided rows
        ws = torch.cat([w, w], dim=1)[:, ::2]    # strided columns
        ys = torch.stack([y, y], dim=1)[::2, 0]  # strided labels
        assert not xs.is_contiguous() and not ws.is_contiguous()
        want = run_loss(None, xs.contiguous(), ws.contiguous(), ys.contiguous(), dict(m2=0.5))
        got = run_loss(backend, xs, ws, ys, dict(m2=0.5))
        for g, r in zip(got, want):
            assert max_rel_err(g, r) < 1e-10

    def test_empty_batch(self, backend):
        x, w, _ = make_inputs(3, 5, 4)
        x0 = x[:0].clone().requires_grad_()
        w0 = w.clone().requires_grad_()
        y0 = torch.zeros(0, dtype=torch.long)
        for red in ("mean", "sum"):
            loss = ak.arcface_loss(x0, w0, y0, backend=backend, reduction=red)
            assert loss.item() == 0.0
            dx, dw = torch.autograd.grad(loss, (x0, w0))
            assert dx.shape == (0, 4) and torch.equal(dw, torch.zeros_like(w))
        assert ak.arcface_loss(x0, w0, y0, backend=backend, reduction="none").shape == (0,)

    def test_all_rows_ignored(self, backend):
        x, w, y = _inputs(dtype=torch.float64)
        y[:] = -100
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = ak.arcface_loss(xr, wr, y, backend=backend, label_smoothing=0.1)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(xr.grad, torch.zeros_like(x))
        assert torch.equal(wr.grad, torch.zeros_like(w))

    def test_custom_ignore_index(self, backend):
        x, w, y = _inputs(dtype=torch.float64)
        y[0] = 7
        got = ak.arcface_loss(x, w, y, backend=backend, ignore_index=7, reduction="none")
        want = reference_loss(x, w, y, ignore_index=7, reduction="none")
        assert got[0].item() == 0.0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    def test_nan_in_nan_out(self, backend):
        x, w, y = _inputs(dtype=torch.float64)
        x[1, 2] = float("nan")
        per_row = ak.arcface_loss(x, w, y, backend=backend, reduction="none")
        assert torch.isnan(per_row[1])
        assert torch.isfinite(per_row[[0, 2, 3, 4, 5]]).all()
        assert torch.isnan(ak.arcface_loss(x, w, y, backend=backend))

    def test_finite_for_extreme_finite_inputs(self, backend):
        x, w, y = _inputs(dtype=torch.float32)
        assert y[0] >= 0
        x = x * 1e18
        w[(y[0] + 1) % w.shape[0]] *= 1e-18
        w[y[0]] = x[0] * 1e-18  # row 0 exactly parallel to ITS TARGET: cosine 1 (clamped)
        for mode in (dict(m2=0.5), dict(m1=0.8, m2=0.3, s=16.0), dict(m1=1.35, m2=0.0)):
            loss, dx, dw = run_loss(backend, x, w, y, mode)     # psi(1), psi'(1) at its floor
            assert torch.isfinite(loss) and torch.isfinite(dx).all() \
                and torch.isfinite(dw).all(), mode
            # the values themselves: arcface_kernels.testing's parallel / parallel_m1 cases

    def test_stats(self, backend):
        x, w, y = _inputs(dtype=torch.float64)
        loss, stats = ak.arcface_loss(x, w, y, backend=backend, return_stats=True)
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
        assert torch.equal(stats.prediction, cos.argmax(dim=1))
        torch.testing.assert_close(stats.max_logit, 64.0 * cos.max(dim=1).values)
        acc = stats.accuracy(y)
        assert acc.item() == pytest.approx((cos.argmax(1) == y).double().mean().item())


# ---------------------------------------------------------------------------- module
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_learns_separable_problem(backend):
    torch.manual_seed(0)
    c, d, n = 8, 6, 64
    centres = torch.nn.functional.normalize(torch.randn(c, d), dim=1)
    y = torch.randint(0, c, (n,))
    x = centres[y] + 0.1 * torch.randn(n, d)
    head = ak.ArcFaceLoss(d, c, s=16.0, m2=0.2, backend=backend)
    assert head.weight.shape == (c, d)
    assert abs(head.weight.std().item() - 0.01) < 0.005
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = head(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert head.last_stats.accuracy(y).item() > 0.9


def test_module_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        ak.ArcFaceLoss(4, 0)
    with pytest.raises(ValueError, match="m2 must be in"):
        ak.ArcFaceLoss(4, 3, m2=-1.0)
    head = ak.ArcFaceLoss(4, 3)
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor, got ndarray"):
        head(torch.zeros(2, 4).numpy(), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------- ops
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_opcheck(backend):
    x, w, y = make_inputs(6, 5, 4)
    y = torch.where(y < 0, -1, y)
    be = resolve_backend(backend, torch.device("cpu"))
    scalars = (16.0, 1.0, 0.5, 0.0, 0, 0, True, 1, 0.0, 0.0, 0.0, 0)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.library.opcheck(be.fwd, (xr, wr, y, None, None, *scalars))
    idx = torch.tensor([4, 0, 2])
    yi = torch.tensor([0, 1, -1, 2, 0, -1])
    torch.library.opcheck(be.fwd, (xr, wr, yi, idx, None, *scalars))
    lse = be.fwd(x, w, y, None, None, *scalars)[0]
    g = torch.rand(6, dtype=torch.float64)
    torch.library.opcheck(be.bwd, (x, w, y, None, None, lse, g, -g, 0.1 * g, *scalars))


def test_opcheck_local_labels():
    y = torch.tensor([3, -100, 0, 9, 5])
    torch.library.opcheck(torch.ops.arcface_kernels.local_labels.default, (y, 2, 5, 10, -100))
    assert torch.ops.arcface_kernels.local_labels(y, 2, 5, 10, -100).tolist() == [1, -1, -1, -1, 3]


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_compile_fullgraph(backend):
    x, w, y = make_inputs(16, 9, 8, dtype=torch.float32)

    def step(x, w, y):
        loss, stats = ak.arcface_loss(x, w, y, backend=backend, label_smoothing=0.1,
                                      return_stats=True)
        return loss, stats.prediction

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, pred = fn(xr, wr, y)
        loss.backward()
        results.append((loss.detach(), pred, xr.grad, wr.grad))
    torch.testing.assert_close(results[1], results[0])


def test_compile_inductor_chunked():
    x, w, y = make_inputs(16, 9, 8, dtype=torch.float32)
    f = torch.compile(lambda a, b: ak.arcface_loss(a, b, y, backend="chunked"), fullgraph=True)
    grads = []
    for fn in (f, lambda a, b: ak.arcface_loss(a, b, y, backend="chunked")):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xr, wr)
        loss.backward()
        grads.append((loss.detach(), xr.grad, wr.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_labels_raise_under_compile():
    x, w, y = make_inputs(6, 5, 4, dtype=torch.float32, ignore_some=False)
    y[2] = 11
    f = torch.compile(lambda a, b, c: ak.arcface_loss(a, b, c, backend="chunked"),
                      fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\).*got 11"):
        f(x, w, y)


# ---------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_raises_clearly(backend):
    """create_graph=True gives the plain first-order gradients, and differentiating them
    raises a clear error (it used to give a silently zero second derivative, or an
    unrelated in-place error, depending on the backend)."""
    x, w, y = _inputs(dtype=torch.float32)
    kw = dict(backend=backend, s=16.0, m2=0.5, reduction="sum")
    xp, wp = x.clone().requires_grad_(), w.clone().requires_grad_()
    plain = torch.autograd.grad(ak.arcface_loss(xp, wp, y, **kw), (xp, wp))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx, gw = torch.autograd.grad(ak.arcface_loss(xr, wr, y, **kw), (xr, wr),
                                 create_graph=True)
    assert torch.equal(gx.detach(), plain[0]) and torch.equal(gw.detach(), plain[1])
    for out, wrt in ((gx, wr), (gx, xr), (gw, wr)):
        with pytest.raises(RuntimeError, match="not differentiable.*double backward"):
            torch.autograd.grad(out.pow(2).sum(), wrt, retain_graph=True)
    # also when another, differentiable term shares the gradient
    xr2 = x.clone().requires_grad_()
    total = ak.arcface_loss(xr2, w, y, **kw) + xr2.pow(3).sum()
    (g,) = torch.autograd.grad(total, xr2, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(g.sum(), xr2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_changes_nothing(backend):
    """Under torch.autocast (a mixed-precision training loop) the loss of float32 inputs
    and its gradients are those computed without it, whether backward runs outside the
    autocast region (the usual loop) or inside it. The Python backends used to run their
    matmuls in bfloat16 there (loss off by ~2e-2) and to crash in the backward."""
    x, w, y = make_inputs(32, 50, 24, dtype=torch.float32)
    kw = dict(backend=backend, label_smoothing=0.1)
    xp, wp = x.clone().requires_grad_(), w.clone().requires_grad_()
    want_loss = ak.arcface_loss(xp, wp, y, **kw)
    want = (want_loss.detach(),) + torch.autograd.grad(want_loss, (xp, wp))
    for backward_inside in (False, True):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ak.arcface_loss(xr, wr, y, **kw)
            if backward_inside:
                grads = torch.autograd.grad(loss, (xr, wr))
        if not backward_inside:
            grads = torch.autograd.grad(loss, (xr, wr))
        assert loss.dtype == torch.float32
        torch.testing.assert_close((loss.detach(),) + grads, want, rtol=1e-6, atol=1e-6)


def test_autocast_module_with_half_embeddings():
    """ArcFaceLoss in an autocast region: bfloat16 embeddings, float32 master weight ->
    the loss equals that of the same bfloat16 inputs without autocast."""
    x, _, y = make_inputs(16, 9, 8, dtype=torch.float32, ignore_some=False)
    head = ak.ArcFaceLoss(8, 9, backend="chunked")
    xb = x.to(torch.bfloat16)
    want = head(xb, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(xb, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- compile
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_compile_module_dynamic_shapes(backend):
    """torch.compile(ArcFaceLoss, fullgraph=True, dynamic=True): float knobs then reach
    the config as symbolic floats (math.isfinite used to reject them); two batch sizes,
    same loss and gradients as eager."""
    torch.manual_seed(0)
    head = ak.ArcFaceLoss(8, 9, s=32.0, m2=0.4, label_smoothing=0.1, backend=backend)
    compiled = torch.compile(head, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (16, 11):
        x, _, y = make_inputs(n, 9, 8, dtype=torch.float32, seed=n)
        results = []
        for fn in (head, compiled):
            head.weight.grad = None
            xr = x.clone().requires_grad_()
            loss = fn(xr, y)
            loss.backward()
            results.append((loss.detach(), xr.grad, head.weight.grad.clone(),
                            head.last_stats.prediction))
        torch.testing.assert_close(results[1], results[0])


# ---------------------------------------------------------------------------- backends
def test_python_backends_run_on_any_device_type():
    """reference and chunked are plain PyTorch (README: "runs on: any"): "auto" and an
    explicit choice accept device types other than cpu / cuda; native backends don't."""
    for dev in ("mps", "xpu"):
        assert resolve_backend("auto", torch.device(dev)).name == "chunked"
        for name in ("chunked", "reference"):
            assert resolve_backend(name, torch.device(dev)).name == name
    if "cpp" in ak.available_backends():
        with pytest.raises(ValueError, match="backend 'cpp' does not run on mps tensors"):
            resolve_backend("cpp", torch.device("mps"))


# ---------------------------------------------------------------------------- stats
def test_stats_accuracy_label_shapes():
    x, w, y = _inputs(dtype=torch.float64)
    y[0] = -100
    _, stats = ak.arcface_loss(x, w, y, backend="chunked", return_stats=True)
    want = stats.accuracy(y)
    hits = ((stats.prediction == y) & (y != -100)).sum().item()
    assert want.item() == pytest.approx(hits / 5)
    # insightface-style [N, 1] labels: the same number (not an [N, N] broadcast)
    assert stats.accuracy(y.view(-1, 1)).item() == want.item()
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\).*got \(4,\)"):
        stats.accuracy(y[:4])


def test_module_rejects_unknown_backend_at_construction():
    """A misspelt backend fails when the head is built, not at its first forward."""
    for make in (lambda: ak.ArcFaceLoss(4, 3, backend="trition"),
                 lambda: ak.PartialFC(4, 3, backend="cudnn")):
        with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \[.*\], "
                                             r"got '(trition|cudnn)'"):
            make()


# ------------------------------------------------------------------ gradient filter
def _filtered_grads(backend, eps, label_smoothing=0.0, seed=11):
    x, w, y = make_inputs(33, 70, 24, seed=seed)
    grads = []
    for e in (None, eps):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ak.arcface_loss(xr, wr, y, backend=backend, s=64.0, grad_filter_eps=e,
                        label_smoothing=label_smoothing).backward()
        grads.append((xr.grad, wr.grad))
    return x, w, y, grads


@pytest.mark.parametrize("backend", [b for b in ("chunked", "triton")
                                     if b in ak.available_backends()])
def test_grad_filter_error_is_bounded(backend):
    """With grad_filter_eps the gradient moves, by at most the dropped softmax values:
    each dropped p_ij < eps changes G_ij by at most s g_p eps (g_p = 1 / rows counted),
    so |d dx_i| <= 2 a_i s g_p eps C and |d dw_j| <= 2 b_j s eps sum_i g_p_i."""
    eps = 1e-3
    x, w, y, ((dx0, dw0), (dx1, dw1)) = _filtered_grads(backend, eps)
    assert not torch.equal(dx0, dx1) and not torch.equal(dw0, dw1)   # it filtered
    n_valid = int((y != -100).sum())
    g_p = 1.0 / n_valid
    s, c = 64.0, w.shape[0]
    a, b = 1 / x.norm(dim=1), 1 / w.norm(dim=1)
    assert ((dx1 - dx0).norm(dim=1) <= 2 * a * s * g_p * eps * c * (1 + 1e-9)).all()
    assert ((dw1 - dw0).norm(dim=1) <= 2 * b * s * eps * g_p * n_valid * (1 + 1e-9)).all()


@pytest.mark.parametrize("backend", [b for b in ("chunked", "triton")
                                     if b in ak.available_backends()])
def test_grad_filter_below_every_softmax_value_is_exact(backend):
    """An eps below every p (here 1e-300, with s small enough that no p underflows)
    drops nothing: the gradient is bitwise the exact one; with label smoothing the
    filter keeps the smoothing term of dropped tiles."""
    x, w, y = make_inputs(33, 70, 24, seed=3)
    out = []
    for e in (None, 1e-300):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ak.arcface_loss(xr, wr, y, backend=backend, s=4.0, grad_filter_eps=e,
                        label_smoothing=0.1).backward()
        out.append((xr.grad, wr.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_grad_filter_refused_where_not_implemented():
    x, w, y = make_inputs(6, 5, 4)
    with pytest.raises(NotImplementedError, match="reference backend .* no gradient filter"):
        ak.arcface_loss(x.requires_grad_(), w, y, backend="reference",
                        grad_filter_eps=1e-3).backward()


@pytest.mark.parametrize("eps", [0, 0.0, 1.0, -1e-3, float("nan"), "1e-3", True])
def test_grad_filter_eps_checked(eps):
    x, w, y = make_inputs(6, 5, 4)
    with pytest.raises(ValueError, match="grad_filter_eps must be None or a float in"):
        ak.arcface_loss(x, w, y, backend="chunked", grad_filter_eps=eps)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        ak.ArcFaceLoss(4, 5, grad_filter_eps=eps)


# ------------------------------------------------------------------- ArcFaceFunction
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_arcface_function_equals_arcface_loss(backend, reduction):
    x, w, y = make_inputs(9, 13, 5, seed=4)
    margin = ak.MarginConfig(s=16.0, m2=0.3, m3=0.05)
    opts = ak.LossOptions(reduction=reduction, label_smoothing=0.1, backend=backend)
    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = ak.ArcFaceFunction.apply(xa, wa, y, margin, opts)
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = ak.arcface_loss(xb, wb, y, s=16.0, m2=0.3, m3=0.05, reduction=reduction,
                           label_smoothing=0.1, backend=backend)
    gout = torch.rand(got.shape, dtype=got.dtype) + 0.5
    ga = torch.autograd.grad(got, (xa, wa), gout)
    gb = torch.autograd.grad(want, (xb, wb), gout)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_arcface_function_gradcheck_and_compile():
    x, w, y = make_inputs(4, 5, 3, seed=2)
    x.requires_grad_(True)
    w.requires_grad_(True)
    margin, opts = ak.MarginConfig(s=4.0, m2=0.3), ak.LossOptions(backend="chunked")
    assert torch.autograd.gradcheck(
        lambda a, b: ak.ArcFaceFunction.apply(a, b, y, margin, opts), (x, w))
    f = torch.compile(lambda a, b: ak.ArcFaceFunction.apply(a, b, y, margin, opts),
                      fullgraph=True, backend="aot_eager")
    got = f(x, w)
    got.backward()
    want = ak.arcface_loss(x.detach(), w.detach(), y, s=4.0, m2=0.3, backend="chunked")
    torch.testing.assert_close(got.detach(), want)
    assert torch.isfinite(x.grad).all()
    with pytest.raises(TypeError, match="margin must be a MarginConfig"):
        ak.ArcFaceFunction.apply(x, w, y, dict(s=4.0), opts)


def test_one_workspace_bound():
    """WORKSPACE_BYTES is every chunking backend's default bound, in bytes."""
    from arcface_kernels._config import WORKSPACE_BYTES
    from arcface_kernels.chunked import default_block
    assert default_block(1024, 1, torch.float32) * 1024 * 4 <= WORKSPACE_BYTES
    assert default_block(1024, 1, torch.float32) * 1024 * 4 > WORKSPACE_BYTES - 1024 * 4
    assert default_block(1 << 30, 2, torch.float64) == 1   # at least one class
    if "cpp" in ak.available_backends():
        from arcface_kernels import _C
        assert _C.WORKSPACE_BYTES == WORKSPACE_BYTES
    try:
        from arcface_kernels.triton_kernels.options import Options
    except ImportError:
        return
    assert Options().workspace_bytes == WORKSPACE_BYTES
