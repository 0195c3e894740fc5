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

import arcface_kernels as ak  # noqa: E402
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
        outs = tops.FWD_OP(x, w, y, None, *args)
        v = torch.zeros(6, dtype=torch.float32, device=DEVICE)
        dx, dw = tops.BWD_OP(x, w, y, None, v, v, v, v, *args)
    assert [tuple(o.shape) for o in outs] == [(6,)] * 5
    assert [o.dtype for o in outs] == [torch.float32] * 4 + [torch.int64]
    assert (tuple(dx.shape), dx.dtype, tuple(dw.shape), dw.dtype) == \
        ((6, 5), torch.float16, (8, 5), torch.float16)


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
       torch.tensor([0, 7, 2], device="cuda"), *MarginConfig().op_args(), 0.0, 0)
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
