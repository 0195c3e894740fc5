"""The triton backend against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with one, the same tests run natively on
it. bf16, torch.compile and the large-shape checks need a GPU (marked ``gpu``). The op-level
tests shared by every backend (registration, opcheck, index, empty shards, blocks, extreme
input, NaN, bad input) are in test_ops.py.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import arcface_kernels as ak  # noqa: E402
from arcface_kernels.triton_kernels import math as tmath  # noqa: E402
from arcface_kernels import reference as ref  # noqa: E402
from arcface_kernels._config import GRAD_MODES, WRAP_MODES, MarginConfig  # noqa: E402
from arcface_kernels.backends import resolve_backend  # noqa: E402
from _cases import (MODES, assert_low_precision_ok, make_inputs,  # noqa: E402
                    max_rel_err, run_loss)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "triton"



def _ops():
    import arcface_kernels._triton as tops
    return tops


def _launch():
    from arcface_kernels.triton_kernels import launch
    return launch


@triton.jit
def _softcap_helpers_kernel(v_ptr, z_ptr, d_ptr, z2_ptr, d2_ptr, t_ptr, cap, M,
                            BLOCK: tl.constexpr):
    """math.py's soft-cap helpers on a vector (test_tanh_helpers_at_extremes)."""
    i = tl.arange(0, BLOCK)
    m = i < M
    v = tl.load(v_ptr + i, mask=m, other=0.0)
    c = tl.full(v.shape, cap, v.dtype)
    inv = 1.0 / c
    tl.store(z_ptr + i, tmath.softcap(v, c, inv), mask=m)
    tl.store(d_ptr + i, tmath.softcap_grad(v, inv), mask=m)
    z2, d2 = tmath.softcap_and_grad(v, c, inv)
    tl.store(z2_ptr + i, z2, mask=m)
    tl.store(d2_ptr + i, d2, mask=m)
    tl.store(t_ptr + i, tmath.tanh(v), mask=m)


# --- constants, fake kernels ----------------------------------------------------------
def test_math_constants_match_python():
    from arcface_kernels.triton_kernels import math as tmath
    assert tmath.WRAP_FALLBACK.value == WRAP_MODES["fallback"]
    assert tmath.WRAP_EASY.value == WRAP_MODES["easy"]
    assert tmath.WRAP_NONE.value == WRAP_MODES["none"]
    assert tmath.GRAD_EXACT.value == GRAD_MODES["exact"]
    assert tmath.GRAD_STRAIGHT.value == GRAD_MODES["straight_through"]
    assert tmath.NORM_EPS.value == ref.NORM_EPS
    assert tmath.SIN2_MIN.value == ref.SIN2_MIN


def test_fake_tensor_shapes():
    """triton_op derives the meta kernel by tracing the launcher: check it gives the
    shared fakes' shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    tops = _ops()
    with FakeTensorMode():
        x = torch.empty(6, 5, dtype=torch.float16, device=DEVICE)
        w = torch.empty(8, 5, dtype=torch.float16, device=DEVICE)
        y = torch.zeros(6, dtype=torch.long, device=DEVICE)
        args = MarginConfig(sub_centers=2).op_args() + (0.0, 0)
        outs = tops.FWD_OP(x, w, y, None, None, *args)
        v = torch.zeros(6, dtype=torch.float32, device=DEVICE)
        dx, dw, db = tops.BWD_OP(x, w, y, None, None, v, v, v, v, *args)
        bias = torch.empty(4, dtype=torch.float16, device=DEVICE)
        args_t = MarginConfig(sub_centers=2, softcap=5.0,
                              interclass_filtering_threshold=0.2).op_args() + (0.0, 0)
        outs_b = tops.FWD_OP(x, w, y, None, bias, *args_t)
        dbb = tops.BWD_OP(x, w, y, None, bias, v, v, v, v, *args_t)[2]
    assert [tuple(o.shape) for o in outs] == [(6,)] * 5
    assert [o.dtype for o in outs] == [torch.float32] * 4 + [torch.int64]
    assert [(tuple(o.shape), o.dtype) for o in outs_b] == [(tuple(o.shape), o.dtype)
                                                          for o in outs]
    assert (tuple(dx.shape), dx.dtype, tuple(dw.shape), dw.dtype) == \
        ((6, 5), torch.float16, (8, 5), torch.float16)
    assert (tuple(db.shape), db.dtype) == ((0,), torch.float16)
    assert (tuple(dbb.shape), dbb.dtype) == ((4,), torch.float16)


# --- equality with the reference -------------------------------------------------------
def test_launch_geometry():
    """The backward workspace stays within its byte budget at the design's shapes, and
    the forward's class splits cover every class block once and fill >= 2 waves."""
    tops = _launch()
    for n, c, k in ((8192, 1 << 20, 1), (1024, 1 << 20, 1), (8192, 262144, 3)):
        cb = tops.chunk_classes(n, k, 2, c, 0, 128)
        assert cb % 128 == 0 and n * cb * k * 2 <= tops.OPTIONS.workspace_bytes
    for row_blocks, class_blocks in ((8, 8192), (64, 2048), (1, 1), (3, 2), (128, 700)):
        sp, per = tops._class_splits(row_blocks, class_blocks, 16, 264)
        assert per % 16 == 0 and sp == -(-class_blocks * 16 // per)
        assert (sp - 1) * per < class_blocks * 16 <= sp * per
        assert row_blocks * sp >= min(264, row_blocks * class_blocks)


def test_strided_inputs():
    """A row-strided weight (a slice of a wider tensor: read in place, stride(0) = 40)
    and a column-major embedding view (copied) give the reference's results."""
    x, w, y = make_inputs(33, 70, 24, seed=6)
    want = run_loss(None, x, w, y, MODES["arcface"])
    wide = torch.zeros(70, 40, dtype=torch.float64, device=DEVICE)
    wide[:, 3:27] = w.to(DEVICE)
    wide.requires_grad_(True)
    x_cm = x.t().contiguous().to(DEVICE).requires_grad_(True)      # [D, N]
    w_view, x_view = wide[:, 3:27], x_cm.t()
    assert w_view.stride() == (40, 1) and x_view.stride() == (1, 33)
    loss = ak.arcface_loss(x_view, w_view, y.to(DEVICE), backend=BACKEND, **MODES["arcface"])
    gout = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64).to(loss) + 0.5
    loss.backward(gout)
    assert max_rel_err(loss.detach(), want[0]) <= 1e-10
    assert max_rel_err(x_cm.grad.t(), want[1]) <= 1e-10
    assert max_rel_err(wide.grad[:, 3:27], want[2]) <= 1e-10
    assert (wide.grad[:, :3] == 0).all() and (wide.grad[:, 27:] == 0).all()


# --- bias, soft cap, interclass filter (docs/design.md section 3) against the reference ops
_REF_FWD = torch.ops.arcface_kernels.reference_fwd.default
_REF_BWD = torch.ops.arcface_kernels.reference_bwd.default

TERM_CASES = {
    # name: (MarginConfig keywords, bias, index, block)
    "bias": (dict(s=16.0, m2=0.5), True, False, 0),
    "softcap": (dict(s=24.0, m2=0.5, softcap=8.0), False, False, 0),
    "interclass": (dict(s=32.0, m2=0.3, interclass_filtering_threshold=0.15), False, False,
                   0),
    "bias_softcap": (dict(s=16.0, m2=0.5, softcap=6.0), True, False, 16),
    "bias_interclass_k2": (dict(s=16.0, m2=0.5, sub_centers=2,
                                interclass_filtering_threshold=0.1), True, False, 0),
    "softcap_interclass_index": (dict(s=20.0, m2=0.0, m3=0.35, softcap=7.0,
                                      interclass_filtering_threshold=0.2), False, True, 0),
    "all_k2_index_chunks": (dict(s=16.0, m2=0.4, sub_centers=2, softcap=10.0,
                                 interclass_filtering_threshold=0.25), True, True, 16),
    "all_linear": (dict(s=1.0, m2=0.0, m3=0.5, normalize=False, softcap=3.0,
                        interclass_filtering_threshold=0.5), True, False, 16),
    "all_sphereface_easy": (dict(s=12.0, m1=1.5, m2=0.2, margin_mode="easy", softcap=9.0,
                                 interclass_filtering_threshold=0.05), True, True, 0),
    # with normalization a threshold >= 1 drops nothing (the kernels switch it off)
    "interclass_one": (dict(s=16.0, interclass_filtering_threshold=1.0), True, False, 0),
}
_TERM_INDEX = torch.tensor([7, 2, 9, 2, 0, 11, 4, 5, 1, 7, 3, 13, 6, 2, 12, 10, 8, 7, 14,
                            15, 16, 17, 19])   # 23 of 20 classes: repeats, one missing


def _term_inputs(n, c, d, k, index, seed):
    """x [n, d] leaning toward the target class (so the filter and the cap see a range
    of cosines), w [c k, d], labels (shard positions, some -1), bias [c], g_p, g_t, g_s."""
    g = torch.Generator().manual_seed(seed)
    shard = index.shape[0] if index is not None else c
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, shard, (n,), generator=g)
    labels[2::5] = -1
    cls = index[labels.clamp(min=0)] if index is not None else labels.clamp(min=0)
    lean = torch.linspace(-1.0, 3.0, n, dtype=torch.float64).unsqueeze(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) \
        + lean * w.view(c, k, d)[cls, 0] / w.norm(dim=1).mean()
    bias = 2.0 * torch.randn(c, generator=g, dtype=torch.float64)
    g_p = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    g_p[labels < 0] *= 0.5
    return x, w, labels, bias, g_p, -0.9 * g_p, -0.1 / shard * g_p


def _check_terms(cfg, use_bias, use_index, block, dtype, *, n=13, c=20, d=12, seed=3,
                 scale_x=1.0):
    """Forward outputs and (dx, dw, dbias) of the triton ops against the reference ops
    on the same (dtype-rounded) inputs: 1e-10 in float64, 1e-4 relative in float32."""
    tops = _ops()
    index = _TERM_INDEX if use_index else None
    x, w, labels, bias, g_p, g_t, g_s = _term_inputs(n, c, d, cfg.sub_centers, index, seed)
    x = x * scale_x
    x, w, bias = x.to(dtype), w.to(dtype), bias.to(dtype) if use_bias else None
    args = cfg.op_args() + (0.0, block)
    ref_args = cfg.op_args() + (0.0, 0)
    want = _REF_FWD(x.double(), w.double(), labels, index,
                    None if bias is None else bias.double(), *ref_args)
    dev = [t if t is None else t.to(DEVICE) for t in (x, w, labels, index, bias)]
    got = [o.cpu() for o in tops.FWD_OP(*dev, *args)]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, gv, wv in zip(("lse", "target", "sum_z", "max_z"), got, want):
        assert gv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert max_rel_err(gv, wv) <= tol, (name, max_rel_err(gv, wv))
    if dtype == torch.float64:
        assert torch.equal(got[4], want[4])
    # the backward at the reference's lse (so both differentiate the same point)
    lse = want[0]
    rows = [t.to(lse.dtype) for t in (g_p, g_t, g_s)]
    want_b = _REF_BWD(x.double(), w.double(), labels, index,
                      None if bias is None else bias.double(), lse, *rows, *ref_args)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got_b = tops.BWD_OP(*dev, lse.to(acc).to(DEVICE), *(r.to(acc).to(DEVICE) for r in rows),
                        *args)
    for name, gv, wv in zip(("dx", "dw", "dbias"), got_b, want_b):
        if name == "dbias" and bias is None:
            assert gv.shape == (0,) and gv.dtype == dtype and wv.numel() == 0
            continue
        assert gv.dtype == dtype and gv.shape == wv.shape, (name, gv.dtype, gv.shape)
        assert torch.isfinite(gv).all(), name
        assert max_rel_err(gv.cpu(), wv) <= tol, (name, max_rel_err(gv.cpu(), wv))
    return got, got_b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(TERM_CASES))
def test_terms_against_reference_ops(case, dtype):
    """bias, soft cap and interclass filter, alone and together, with sub-centers, an
    index (repeated classes accumulate in dbias; a class outside the shard gets 0),
    several backward chunks (block=16) and the non-normalized head."""
    kw, use_bias, use_index, block = TERM_CASES[case]
    _got, got_b = _check_terms(MarginConfig(**kw), use_bias, use_index, block, dtype)
    if use_bias and use_index:
        assert got_b[2][18] == 0    # class 18 is not in the index


def test_terms_switch_off_cleanly():
    """Without bias, soft cap and filter the kernels get every new switch False (they
    compile to the work they did before these terms); a normalized threshold >= 1 drops
    nothing and is switched off too."""
    launch = _launch()
    assert launch._terms(True, None, 0.0, 0.0) == dict(HAS_BIAS=False, SOFTCAP=False,
                                                       INTERCLASS=False)
    assert launch._terms(True, None, 0.0, 1.0)["INTERCLASS"] is False
    assert launch._terms(False, None, 0.0, 1.0)["INTERCLASS"] is True
    assert launch._terms(True, torch.zeros(1), 2.0, 0.5) == dict(
        HAS_BIAS=True, SOFTCAP=True, INTERCLASS=True)


# the backward's plain logit of a target column may pass lse by more than exp2's range
# at s = 256 in float32 (its softmax value is clamped to 1, then replaced by the target's
# entry); the interpreter (numpy) warns about the inf
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_interclass_filter_far_below_the_top1():
    """Large s in float32 with most non-target cosines above the threshold: the filtered
    logits (z = bias) sit far below the top-1's max (s c + bias, up to s log2 e above),
    so the exponential sum needs its own running max; one shifted by the top-1's would
    underflow to 0 and give lse = -inf or the target logit alone."""
    cfg = MarginConfig(s=256.0, m2=0.5, interclass_filtering_threshold=0.01)
    _check_terms(cfg, True, False, 0, torch.float32, d=4, seed=9)


def test_softcap_saturated_logits():
    """Unnormalized logits of order 1e15 under a soft cap: z = +-cap exactly, dz/dv = 0,
    finite gradients, and the reference's values."""
    cfg = MarginConfig(s=1.0, m2=0.0, normalize=False, softcap=5.0)
    got, got_b = _check_terms(cfg, True, False, 0, torch.float32, scale_x=1e15)
    assert (got[3].abs() <= 5.0).all() and torch.isfinite(got[0]).all()


def test_nan_row_with_terms():
    """NaN in, NaN out: a NaN in row 4 of x makes that row's lse, max_z and dx NaN (the
    soft cap keeps NaN) and leaves every other row finite."""
    tops = _ops()
    cfg = MarginConfig(s=16.0, softcap=6.0, interclass_filtering_threshold=0.2)
    # 12 classes: one masked tile (the interpreter's argmax rejects an all-NaN row)
    x, w, labels, bias, g_p, g_t, g_s = _term_inputs(9, 12, 8, 1, None, 4)
    x[4, 3] = float("nan")
    dev = [t.to(DEVICE) for t in (x, w, labels)]
    args = cfg.op_args() + (0.0, 0)
    lse, _t, _s, max_z, _a = (o.cpu() for o in tops.FWD_OP(*dev, None, bias.to(DEVICE),
                                                           *args))
    ok = torch.arange(9) != 4
    assert torch.isnan(lse[4]) and torch.isnan(max_z[4])
    assert torch.isfinite(lse[ok]).all() and torch.isfinite(max_z[ok]).all()
    dx, _dw, db = tops.BWD_OP(*dev, None, bias.to(DEVICE), lse.to(DEVICE),
                              *(t.to(DEVICE) for t in (g_p, g_t, g_s)), *args)
    assert torch.isnan(dx[4].cpu()).all() and torch.isfinite(dx.cpu()[ok]).all()


def test_tanh_helpers_at_extremes():
    """math.py's tanh / softcap / softcap_grad against torch in float64 and float32: a
    few ulp of 1 (of the cap) near 0 and elsewhere, +-1 (+-cap) and derivative 0 (not NaN)
    for huge |v|, NaN for NaN; the forward's and the backward's soft cap bitwise equal."""
    vals = [0.0, -0.0, 1e-300, -1e-12, 3e-9, 0.1, -0.7, 2.5, -19.0, 40.0, 1e5, -1e30,
            float("inf"), float("-inf"), float("nan")]
    for dtype in (torch.float64, torch.float32):
        eps = torch.finfo(dtype).eps
        v = torch.tensor(vals, dtype=torch.float64).to(dtype)
        outs = [torch.empty_like(v) for _ in range(5)]
        _softcap_helpers_kernel[(1,)](v, *outs, 3.0, v.numel(), BLOCK=16)
        z, dz, z2, dz2, t = outs
        v64 = v.double()
        want_d = torch.cosh(v64 / 3.0) ** -2   # sech^2: no cancellation
        fin = ~torch.isnan(v)
        for got, want, scale in ((t, torch.tanh(v64), 1.0),
                                 (z, 3.0 * torch.tanh(v64 / 3.0), 3.0)):
            assert (got.double() - want)[fin].abs().max() <= 4 * eps * scale, (dtype, got)
            assert torch.isnan(got[~fin]).all()
        assert (t[v.abs() > 1e4].abs() == 1).all() and (z[v.abs() > 1e4].abs() == 3).all()
        # relative, up to the conditioning of exp(-2|v / cap|) (1 + 2|v / cap|)
        keep = fin & (v.abs() < 100)
        rel = ((dz.double() - want_d) / want_d.clamp(min=1e-300))[keep]
        assert (rel.abs() / (1 + 2 * (v64[keep] / 3.0).abs())).max() <= 8 * eps, (dtype, dz)
        assert torch.isnan(dz[~fin]).all() and (dz[v.abs() > 1e4] == 0).all()
        # the forward's z and the backward's are bitwise equal
        torch.testing.assert_close(z, z2, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(dz, dz2, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cuda")).name == BACKEND


# --- precision ---------------------------------------------------------------------------
def test_float16_extreme_norms():
    """Tiny embeddings (|x| ~ 1e-3, inverse norm ~ 1e3) and large class centres in fp16:
    nothing overflows (a_i * dL/dc would pass 65504), and the result equals the float64
    reference on the same fp16-rounded inputs to a few fp16 roundings."""
    x, w, y = make_inputs(33, 70, 24, seed=2)
    x16, w16 = (x * 2e-4).half(), (w * 300.0).half()
    want = run_loss(None, x16.double(), w16.double(), y, MODES["arcface"])
    got = run_loss(BACKEND, x16.to(DEVICE), w16.to(DEVICE), y.to(DEVICE), MODES["arcface"])
    for name, g, r in zip(("loss", "dx", "dw"), got, want):
        assert torch.isfinite(g).all(), name
        assert max_rel_err(g, r) <= 8 * torch.finfo(torch.float16).eps, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [100.0, 5e-4])
def test_half_precision_far_from_unit_norms(dtype, scale):
    """Embeddings and class centres of norm ~600 or ~0.003: the gradient tiles and the
    products stay in float16's range (H carries no inverse norms in float16), so the
    error stays that of naive PyTorch in that precision."""
    assert_low_precision_ok(BACKEND, (33, 70, 24), MODES["arcface"], dtype, device=DEVICE,
                            input_scale=scale)


def test_backward_chunk_bounded_by_the_products_size():
    """A small N with a large D: the chunk is capped so that one [Cb K, D] fp32 product
    fits the workspace too (else N = 8, D = 4096, C = 1M would be one 16 GiB chunk)."""
    launch = _launch()
    budget = launch.OPTIONS.workspace_bytes
    cb = launch.chunk_classes(8, 1, 2, 1 << 20, 0, 128, 4096, 4)
    assert cb % 128 == 0 and cb * 4096 * 4 <= budget and 8 * cb * 2 <= budget


@pytest.mark.parametrize("mode", ["arcface", "sub_centers"])
def test_float16_dw_fp32(mode, monkeypatch):
    """The fp32 dW option (ARCFACE_TRITON_DW_FP32=1 sets OPTIONS.dw_fp32)."""
    import dataclasses
    launch = _launch()
    monkeypatch.setattr(launch, "OPTIONS", dataclasses.replace(launch.OPTIONS, dw_fp32=True))
    assert_low_precision_ok(BACKEND, (33, 70, 24), MODES[mode], torch.float16, device=DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["arcface", "linear_ce", "smoothing", "sub_centers"])
def test_bfloat16_medium_shape(mode):
    """The tensor-core bf16 path (wgmma / mma.sync; the interpreter upcasts bf16) at a
    medium shape: several row blocks, splits, whole and partial tiles, chunks of the
    backward with split-K partials; forward and backward against the float64 reference
    within 4x naive PyTorch's own bf16 error."""
    assert_low_precision_ok(BACKEND, (777, 20011, 256), MODES[mode], torch.bfloat16,
                            device=DEVICE)


# --- bad input on CUDA ------------------------------------------------------------------
_DEVICE_ASSERT = r"""
import sys, torch, arcface_kernels as ak
from arcface_kernels._config import MarginConfig
x = torch.randn(5, 16, device="cuda"); w = torch.randn(7, 16, device="cuda")
if sys.argv[1] == "labels":
    ak.arcface_loss(x, w, torch.tensor([0, 1, 7, 2, 3], device="cuda"), backend="triton")
else:
    from arcface_kernels.backends import resolve_backend
    op = resolve_backend("triton", torch.device("cuda")).fwd
    op(x, w, torch.tensor([0, 1, 2, -1, 0], device="cuda"),
       torch.tensor([0, 7, 2], device="cuda"), None, *MarginConfig().op_args(), 0.0, 0)
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("what, message", [
    ("labels", "labels must be in [0, 7)"),
    ("index", "index values must be in [0, 7)"),
])
def test_bad_values_on_cuda_are_device_asserts(what, message):
    """On CUDA the value checks do not sync with the host: a bad label or index stops
    the process with a device-side assert naming the argument (in a subprocess: the
    assert poisons the CUDA context)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _DEVICE_ASSERT, what], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "no error" not in out.stdout
    assert message in out.stderr, out.stderr[-2000:]


# --- GPU only ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph(dtype):
    """torch.compile(fullgraph=True) of arcface_loss(backend="triton"): the compiled
    forward and its AOT-compiled backward equal eager."""
    x, w, y = (t.to("cuda") for t in make_inputs(64, 129, 33, dtype=dtype))

    def loss_fn(a, b, labels):
        return ak.arcface_loss(a, b, labels, backend=BACKEND, s=64.0, m2=0.5,
                               label_smoothing=0.1, sub_centers=1)

    compiled = torch.compile(loss_fn, fullgraph=True)
    res = []
    for fn in (compiled, loss_fn):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(xr, wr, y)
        loss.backward()
        res.append((loss.detach(), xr.grad, wr.grad))
    for g, r in zip(*res):
        assert torch.isfinite(g).all()
        assert max_rel_err(g, r) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_large_weight_64bit_offsets():
    """w has C*D > 2^31 elements (4 GiB in fp16): the rows past 2^31 / D must be read and
    written at the right place. Checked against the chunked backend on the same GPU in
    float32 arithmetic."""
    n, c, d = 64, (1 << 22) + 3, 512
    assert c * d > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(c, d, device="cuda", dtype=torch.float16, generator=g)
    x = torch.randn(n, d, device="cuda", dtype=torch.float16, generator=g)
    y = c - 1 - torch.arange(n, device="cuda")            # targets in the last rows
    x += 3.0 * w[y] / w[y].norm(dim=1, keepdim=True) * x.norm(dim=1, keepdim=True)
    res = []
    for backend in (BACKEND, "chunked"):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = ak.arcface_loss(xr, wr, y, backend=backend, reduction="none")
        dx, dw = torch.autograd.grad(loss.sum(), (xr, wr))
        res.append((loss.float(), dx.float(), dw[y].float(), dw[:n].float()))
        del dw
    for got, want in zip(*res):
        assert max_rel_err(got, want) <= 2e-2
    assert math.isfinite(res[0][0].sum().item())
