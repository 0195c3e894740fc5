"""GPU tests of the cpp backend's CUDA kernels (csrc/cuda) against the float64 reference.

Which kernels a call takes (csrc/cuda/host.cpp ``fused_for``): the fused tensor-core
kernels (fused.cuh: wgmma on sm_90, mma.sync on the other sm_80+ devices) for float16 /
bfloat16 inputs with sub_centers K = 1, no bias / softcap / interclass filter, d % 8 == 0
and 16-byte aligned x and w; the general kernels (arcface_cuda.cu) for everything else.
Both are covered, at shapes that leave partial tiles everywhere (N not a multiple of the
128-row tiles, C not a multiple of the 64 / 128-class tiles, D = 72 and 520 with a
partial last k tile; D = 70, not % 8, for the general kernels):

* which kernels a call runs (profiler), for each condition of ``fused_for``;
* the ops' forward outputs (lse, target, sum_z, max_z, argmax) and backward (dx, dw,
  dbias) against the reference ops: every margin mode, K = 1 and 3, a Partial FC index
  with repeated classes, labels outside the shard, bias / softcap / interclass, small
  chunks, misaligned / offset / strided inputs; float32, float16 and bfloat16;
* the loss through ``arcface_loss`` over the checker's grid (arcface_kernels.testing) at
  those shapes and with small chunks, ``PartialFC`` with sampling, ``linear_cross_entropy``;
* N C > 2^31 and C = 2^20 (marked slow): every row and class, against the reference
  evaluated over class chunks (no N x C matrix anywhere);
* huge norms (the overflow-free path), a NaN row, bitwise determinism, CUDA-graph capture
  (no host sync), the device-side assert of a label out of range.

The reference runs in float64 on the very inputs the kernels get (rounded to the dtype
under test), so the tolerances measure the kernels' own arithmetic: forward statistics
1e-4 relative to max(|value|, 1) (float32 cosines times s = 64); gradients 2e-4 (float32)
and 8 eps of the dtype (float16 / bfloat16: the G workspace and the outputs are in that
dtype) relative to the largest magnitude, as in tests/test_cpp.py. Devices below compute
capability 8.0 cannot run these kernels: the module skips there, and without CUDA.
"""
from __future__ import annotations

import functools
import math
import re
import subprocess
import sys
import textwrap
from typing import Dict, NamedTuple, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import arcface_kernels as ak
from arcface_kernels._config import MarginConfig
from arcface_kernels._math import softcap_map
from arcface_kernels._ops import local_labels
from arcface_kernels.reference import NORM_EPS, reference_loss
from arcface_kernels.testing import MARGIN_GRID, check_margin_loss

from _cases import MODES, make_inputs

_cpp = pytest.importorskip("arcface_kernels._cpp",
                           reason="the C++ extension arcface_kernels._C is not built")

HAS_CUDA = torch.cuda.is_available()
CAPABILITY = torch.cuda.get_device_capability() if HAS_CUDA else (0, 0)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cpp.WITH_CUDA, reason="extension built without CUDA kernels"),
    pytest.mark.skipif(HAS_CUDA and CAPABILITY < (8, 0),
                       reason="the cpp backend's CUDA kernels need compute capability 8.0 "
                              "(this device cannot run them)"),
]

DEV = "cuda"
REF_FWD = torch.ops.arcface_kernels.reference_fwd.default
REF_BWD = torch.ops.arcface_kernels.reference_bwd.default

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]


def dt_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# (N, C, D): partial row tiles (128 rows), partial class tiles (64 / 128), partial k tiles.
SHAPES: Dict[str, Tuple[int, int, int]] = {
    "d72": (200, 333, 72),      # fused for 16-bit: two k tiles, the second 8 wide
    "d520": (131, 197, 520),    # fused for 16-bit: nine k tiles
    "d70": (77, 150, 70),       # d % 8 != 0: the general kernels for every dtype
    "wide": (515, 4099, 136),   # many row tiles and class splits to combine
    "d64": (200, 333, 64),      # one k tile per class tile: the copies run two tiles ahead
}
RAGGED = ["d72", "d520", "d70", "d64"]

# The kernels the host launches: fused (sm_90: wgmma, the operand tiles by TMA; with a
# Partial FC index by cp.async, which gathers the rows of w; else mma.sync), general,
# general with the terms (bias / softcap / interclass).
FUSED_ARCH = "sm90" if CAPABILITY == (9, 0) else "sm80"
FUSED_PLAIN = "sm90_tma" if FUSED_ARCH == "sm90" else "sm80"
KERNELS = {
    "fused": (f"fwd_{FUSED_PLAIN}_kernel", f"grad_{FUSED_PLAIN}_kernel"),
    "fused_index": (f"fwd_{FUSED_ARCH}_kernel", f"grad_{FUSED_ARCH}_kernel"),
    "general": ("fwd_kernel", "grad_chunk_kernel"),
    "terms": ("fwd_terms_kernel", "grad_chunk_terms_kernel"),
}

FWD_TOL = 1e-4


def grad_tol(dtype: torch.dtype) -> float:
    return 2e-4 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps


# ------------------------------------------------------------------------------ helpers
def rel_err(got: Tensor, want: Tensor, floor: float = 0.0) -> float:
    """max |got - want| / max(max |want|, floor), in float64 on the device (the measure of
    tests/_cases.py max_rel_err, whose floor is 1: use floor=1 for logits and statistics,
    0 for gradients, whose magnitude is anything). NaN anywhere gives NaN (fails <=)."""
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item(), floor)
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close(name: str, got: Tensor, want: Tensor, tol: float, floor: float = 0.0):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name} has non-finite values"
    err = rel_err(got, want, floor)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def mode_cfg(mode: str, **extra) -> MarginConfig:
    """The MarginConfig of a named mode of tests/_cases.py MODES (op settings only)."""
    settings = {k: v for k, v in MODES[mode].items()
                if k not in ("label_smoothing", "reduction", "ignore_index")}
    settings.update(extra)
    return MarginConfig(**settings)


class OpInputs(NamedTuple):
    """One op call: x, w (float64 on the device), labels (shard positions, -1 = no
    target), index (Partial FC class ids, or None), bias (float64 or None) and the
    backward's row coefficients (g_p, g_t, g_s: float32, what the op is given)."""
    x: Tensor
    w: Tensor
    labels: Tensor
    index: Optional[Tensor]
    bias: Optional[Tensor]
    coeffs: Tuple[Tensor, Tensor, Tensor]


def op_inputs(n: int, c: int, d: int, *, k: int = 1, indexed: bool = False,
              bias: bool = False, seed: int = 0) -> OpInputs:
    """Inputs leaning toward their targets (tests/_cases.py make_inputs: target cosines
    over the whole range, every 4th row without a target); with ``indexed`` a Partial FC
    index of 2C/3 classes with a class repeated within one tile and another far apart."""
    x, w, y = make_inputs(n, c, d, sub_centers=k, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    index = None
    if indexed:
        index = torch.randperm(c, generator=g)[: 2 * c // 3]
        index[1] = index[4]      # repeated in one tile
        index[-1] = index[2]     # and in other tiles / chunks / splits
        labels = torch.randint(-1, index.numel(), (n,), generator=g)
    else:
        labels = torch.where(y >= 0, y, torch.full_like(y, -1))
    b = torch.randn(c, generator=g, dtype=torch.float64) * 2.0 if bias else None
    coeffs = (torch.rand(n, generator=g) + 0.5, -torch.rand(n, generator=g),
              torch.rand(n, generator=g) * 0.1)

    def dev(t):
        return None if t is None else t.to(DEV)
    return OpInputs(dev(x), dev(w), dev(labels), dev(index), dev(b),
                    tuple(dev(t) for t in coeffs))


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def top1_keys(arg: Tensor, x: Tensor, w: Tensor, index: Optional[Tensor],
              bias: Optional[Tensor], cfg: MarginConfig) -> Tensor:
    """float64 capped key (s c + bias; c the class cosine, the max over its K rows) of
    the class at shard position arg[i], per row: what max_z holds at the argmax."""
    k, d = cfg.sub_centers, x.shape[1]
    cls = arg if index is None else index[arg]
    rows = w.view(-1, k, d)[cls].double()                       # [N, K, D]
    x64 = x.double()
    dots = (rows * x64.unsqueeze(1)).sum(-1)
    if cfg.normalize:
        dots = dots / (x64.norm(dim=1, keepdim=True).clamp(min=NORM_EPS)
                       * rows.norm(dim=2).clamp(min=NORM_EPS))
        dots = dots.clamp(-1.0, 1.0)
    key = cfg.s * dots.max(dim=1).values
    if bias is not None:
        key = key + bias.double()[cls]
    return softcap_map(key, cfg.softcap_arg)


def assert_fwd_matches(got, want, x: Tensor, w: Tensor, index: Optional[Tensor],
                       bias: Optional[Tensor], cfg: MarginConfig, rows=None):
    """lse, target, sum_z, max_z within FWD_TOL of the reference's (float32 outputs),
    and argmax a class whose key is the maximum (ties: either class). ``rows``: compare
    only those rows (a bool mask)."""
    sel = (lambda t: t) if rows is None else (lambda t: t[rows])
    for name, a, b in zip(("lse", "target", "sum_z", "max_z"), got[:4], want[:4]):
        assert a.dtype == torch.float32, f"{name}: {a.dtype}"
        assert_close(name, sel(a), sel(b), FWD_TOL, floor=1.0)
    arg = got[4]
    shard = w.shape[0] // cfg.sub_centers if index is None else index.numel()
    assert arg.dtype == torch.int64 and ((arg >= 0) & (arg < shard)).all()
    key = sel(top1_keys(arg, x, w, index, bias, cfg))
    best = sel(want[3]).double()
    gap = best - key
    assert (gap <= FWD_TOL * best.abs().clamp(min=1.0)).all(), \
        f"argmax is not a top class: gap up to {gap.max().item():.3e}"


def check_op(inp: OpInputs, cfg: MarginConfig, dtype: torch.dtype, *, block: int = 0,
             x: Optional[Tensor] = None, w: Optional[Tensor] = None):
    """The cpp ops on CUDA at ``dtype`` against the reference ops in float64 on the same
    rounded values: forward outputs, then (dx, dw, dbias) for the row coefficients of
    ``inp`` and the reference's lse. ``x`` / ``w``: the tensors to pass instead of inp's
    (views, misaligned copies). Returns (fwd outputs, grads)."""
    xl = inp.x.to(dtype) if x is None else x
    wl = inp.w.to(dtype) if w is None else w
    bl = _cast(inp.bias, dtype)
    x64, w64, b64 = xl.double(), wl.double(), _cast(bl, torch.float64)
    args = cfg.op_args() + (0.0,)
    want = REF_FWD(x64, w64, inp.labels, inp.index, b64, *args, 0)
    got = _cpp.FWD_OP(xl, wl, inp.labels, inp.index, bl, *args, block)
    assert_fwd_matches(got, want, x64, w64, inp.index, b64, cfg)
    lse = want[0].float()   # both backwards get the same float32 values
    rgrads = REF_BWD(x64, w64, inp.labels, inp.index, b64, lse.double(),
                     *(t.double() for t in inp.coeffs), *args, 0)
    grads = _cpp.BWD_OP(xl, wl, inp.labels, inp.index, bl, lse, *inp.coeffs, *args, block)
    tol = grad_tol(dtype)
    for name, a, b in zip(("dx", "dw", "dbias"), grads, rgrads):
        if name == "dbias" and bl is None:
            assert a.shape == (0,), a.shape
            continue
        assert a.dtype == dtype, f"{name}: {a.dtype}"
        assert_close(name, a, b, tol)
    if inp.index is not None:   # rows of w (and bias) outside the shard get exactly 0
        k, d = cfg.sub_centers, wl.shape[1]
        outside = torch.ones(wl.shape[0] // k, dtype=torch.bool, device=DEV)
        outside[inp.index] = False
        assert (grads[1].view(-1, k, d)[outside] == 0).all()
        if bl is not None:
            assert (grads[2][outside] == 0).all()
    return got, grads


def offset_copy(t: Tensor, offset: int) -> Tensor:
    """t's values in a contiguous tensor that starts ``offset`` elements into its storage
    (1 element of a 16-bit type: 2 bytes off the 16-byte alignment of the allocation)."""
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def strided_view(t: Tensor) -> Tensor:
    """t's values as a non-contiguous view (the columns of a wider tensor)."""
    wide = torch.cat([t, t[:, :8]], dim=1)
    return wide[:, : t.shape[1]]


def cuda_kernel_names(fn) -> set:
    """Names of the CUDA kernels fn launches (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == DeviceType.CUDA}
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels here (CUPTI unavailable?)")
    return names


def launched(names: set, kernel: str) -> bool:
    """Whether one of the kernel names is ``kernel`` (demangled "ns::fwd_kernel<...>" or
    mangled "...10fwd_kernelI..."; not "fwd_terms_kernel" for "fwd_kernel")."""
    pattern = re.compile(rf"(?<![A-Za-z_]){kernel}(?![a-z0-9_])")
    return any(pattern.search(n) for n in names)


# ------------------------------------------------------------------ kernel selection
# name: (dtype, D, K, how the inputs are made, the kernels expected)
DISPATCH = {
    "bf16": (torch.bfloat16, 72, 1, "plain", "fused"),
    "fp16_d520": (torch.float16, 520, 1, "plain", "fused"),
    "bf16_index": (torch.bfloat16, 72, 1, "index", "fused_index"),
    "fp16_linear": (torch.float16, 72, 1, "linear", "fused"),
    "bf16_strided_x": (torch.bfloat16, 72, 1, "strided_x", "fused"),  # copied: aligned
    "bf16_offset_16B": (torch.bfloat16, 72, 1, "offset8", "fused"),   # still aligned
    "bf16_d70": (torch.bfloat16, 70, 1, "plain", "general"),
    "fp32": (torch.float32, 72, 1, "plain", "general"),
    "bf16_k3": (torch.bfloat16, 72, 3, "plain", "general"),
    "bf16_misaligned_x": (torch.bfloat16, 72, 1, "offset1_x", "general"),
    "fp16_misaligned_w": (torch.float16, 72, 1, "offset1_w", "general"),
    "bf16_bias": (torch.bfloat16, 72, 1, "bias", "terms"),
    "bf16_softcap": (torch.bfloat16, 72, 1, "softcap", "terms"),
    "fp16_interclass": (torch.float16, 72, 1, "interclass", "terms"),
}


def prepared(dtype: torch.dtype, d: int, k: int, how: str, seed: int = 2):
    """(inputs, cfg, x, w) of one dispatch case: x and w at dtype, as ``how`` says."""
    n, c = SHAPES["d72"][:2]
    inp = op_inputs(n, c, d, k=k, indexed=how == "index", bias=how == "bias", seed=seed)
    cfg = {"linear": MarginConfig(s=1.0, m2=0.0, normalize=False),
           "softcap": MarginConfig(softcap=20.0),
           "interclass": MarginConfig(interclass_filtering_threshold=0.2)}.get(
        how, MarginConfig(sub_centers=k))
    x, w = inp.x.to(dtype), inp.w.to(dtype)
    if how == "strided_x":
        x = strided_view(x)
    elif how == "offset8":
        x, w = offset_copy(x, 8), offset_copy(w, 8)
    elif how == "offset1_x":
        x = offset_copy(x, 1)
    elif how == "offset1_w":
        w = offset_copy(w, 1)
    return inp, cfg, x, w


@pytest.mark.parametrize("name", list(DISPATCH))
def test_kernel_dispatch(name):
    """Each condition of host.cpp fused_for, seen from outside: the forward and the
    backward run the fused kernels (the sm_90 wgmma ones on sm_90) exactly when the
    inputs are 16-bit, K = 1, without terms, d % 8 == 0 and 16-byte aligned (after the
    contiguous copy of a strided view), else the general kernels (with the terms when
    asked)."""
    dtype, d, k, how, expect = DISPATCH[name]
    inp, cfg, x, w = prepared(dtype, d, k, how)
    if how.startswith("offset1"):
        assert (x.data_ptr() % 16 != 0) or (w.data_ptr() % 16 != 0)
    args = cfg.op_args() + (0.0, 0)
    bias = _cast(inp.bias, dtype)

    def step():
        lse = _cpp.FWD_OP(x, w, inp.labels, inp.index, bias, *args)[0]
        _cpp.BWD_OP(x, w, inp.labels, inp.index, bias, lse, *inp.coeffs, *args)

    step()  # lazy loading, cuBLAS handles
    names = cuda_kernel_names(step)
    for kernel in {k for ks in KERNELS.values() for k in ks}:
        ran = launched(names, kernel)
        if kernel in KERNELS[expect]:
            assert ran, f"{name}: {kernel} did not run; CUDA kernels: {sorted(names)}"
        else:
            assert not ran, f"{name}: {kernel} ran, expected the {expect} kernels"


@pytest.mark.parametrize("dtype", HALF, ids=dt_id)
@pytest.mark.parametrize("how", ["offset1_x", "offset1_w", "offset8", "strided_x"])
def test_views_match_reference(how, dtype):
    """Misaligned x or w (a storage offset of one element: the general kernels), 16-byte
    offsets and strided views (the fused kernels): all equal to the reference."""
    inp, cfg, x, w = prepared(dtype, 72, 1, how)
    check_op(inp, cfg, dtype, x=x, w=w)
    check_op(inp, cfg, dtype, x=x, w=w, block=37)


# ---------------------------------------------------------------- the ops, every mode
OP_MODES = ["arcface", "cosface", "combined", "sphereface", "combined_m1", "easy",
            "no_wrap", "big_margin_fallback", "straight_through", "linear_ce",
            "linear_cosface"]


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("shape", RAGGED)
@pytest.mark.parametrize("mode", OP_MODES)
def test_op_modes(mode, shape, dtype):
    """Every margin family and wrap mode, the straight-through target gradient and
    normalize=False, at shapes with partial row, class and k tiles."""
    check_op(op_inputs(*SHAPES[shape], seed=1), mode_cfg(mode), dtype)


# (K, indexed)
LAYOUTS = {"plain": (1, False), "index": (1, True), "k3": (3, False), "k3_index": (3, True)}


@pytest.mark.parametrize("block", [0, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("shape", RAGGED + ["wide"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_op_layouts(layout, shape, dtype, block):
    """K = 1 and 3, with and without a Partial FC index holding repeated classes (within
    a tile and in different tiles / chunks / splits), one chunk or chunks of 37 classes
    (a partial tile each, G's leading dimension padded to 40)."""
    k, indexed = LAYOUTS[layout]
    inp = op_inputs(*SHAPES[shape], k=k, indexed=indexed, seed=3)
    check_op(inp, mode_cfg("arcface", sub_centers=k), dtype, block=block)


# the terms of a case and its mode
TERMS = {
    "bias": ("arcface", dict(bias=True)),
    "softcap": ("arcface", dict(softcap=20.0)),
    "interclass": ("combined", dict(interclass=0.2)),
    "all": ("arcface", dict(bias=True, softcap=20.0, interclass=0.2)),
    "linear_bias_softcap": ("linear_ce", dict(bias=True, softcap=30.0)),
}


@pytest.mark.parametrize("block", [0, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("layout", ["plain", "k3_index"])
@pytest.mark.parametrize("terms", list(TERMS))
def test_op_terms(terms, layout, dtype, block):
    """bias / softcap / interclass filter (the general kernels' terms instances), with
    dbias, at D = 72 (so that only the terms rule out the fused kernels)."""
    mode, t = TERMS[terms]
    k, indexed = LAYOUTS[layout]
    inp = op_inputs(*SHAPES["d72"], k=k, indexed=indexed, bias=t.get("bias", False),
                    seed=4)
    cfg = mode_cfg(mode, sub_centers=k, softcap=t.get("softcap"),
                   interclass_filtering_threshold=t.get("interclass", 0.0))
    check_op(inp, cfg, dtype, block=block)


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("shape", ["d72", "d70"])
def test_labels_outside_the_shard(shape, dtype):
    """A shard of classes [C, 2C) of 3C: global labels below it, above it (>= the shard's
    C, up to the last class) and ignored become -1 (local_labels, as PartialFC maps
    them); those rows have target 0 and the loss lse alone."""
    n, c, d = SHAPES[shape]
    total, start = 3 * c, c
    x, w_all, _ = make_inputs(n, total, d, seed=5)
    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, total, (n,), generator=g)
    y[:6] = torch.tensor([start - 1, start + c, total - 1, start, start + c - 1, -100])
    local = local_labels(y.to(DEV), start, c, total, -100)
    assert local[:6].tolist() == [-1, -1, -1, 0, c - 1, -1]
    assert (local >= 0).any() and (local < 0).sum() > n // 2
    coeffs = tuple(t.to(DEV) for t in (torch.rand(n, generator=g) + 0.5,
                                       -torch.rand(n, generator=g),
                                       torch.rand(n, generator=g) * 0.1))
    inp = OpInputs(x.to(DEV), w_all[start:start + c].to(DEV), local, None, None, coeffs)
    got, _ = check_op(inp, MarginConfig(), dtype, block=50)
    assert (got[1][local < 0] == 0).all()


def test_label_out_of_range_is_a_device_assert():
    """A label >= C (or < -1) is not silently a row without target: the op's device-side
    check stops the process (run in a child: the CUDA context is lost after it)."""
    code = textwrap.dedent("""
        import torch
        from arcface_kernels import _cpp
        from arcface_kernels._config import MarginConfig
        x = torch.randn(130, 72, device="cuda").bfloat16()
        w = torch.randn(333, 72, device="cuda").bfloat16()
        y = torch.randint(0, 333, (130,), device="cuda")
        y[129] = 333
        out = _cpp.FWD_OP(x, w, y, None, None, *MarginConfig().op_args(), 0.0, 0)
        torch.cuda.synchronize()
        print("NO ASSERT", out[0][129].item())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "NO ASSERT" not in r.stdout, r.stdout[-2000:]
    assert "device-side assert" in r.stderr or "labels must be in" in r.stderr, \
        r.stderr[-2000:]


# ------------------------------------------------------------- the loss, checker's grid
GRID = {c.name: c for c in MARGIN_GRID}
GRID_NAMES = ["arcface_s64", "cosface", "combined", "sphereface", "combined_m1",
              "m1_below_1_near_pi", "easy", "no_wrap", "big_margin_fallback", "wrap_point",
              "wrap_point_m1", "straight_through", "smoothing", "ignore_index",
              "reduction_sum", "reduction_none", "sub_centers", "sub_center_flip",
              "linear_ce", "linear_cosface", "parallel", "zero_rows", "huge_norms",
              "tiny_norms", "below_norm_floor", "duplicate_rows"]
# Targets at cos = +-1: psi' there is ~5e5 (sin^2 floored at 1e-12), and s g psi'
# overflows float16's G workspace (README "Precision"): not run in float16.
FP16_UNSAFE_PATTERNS = ("parallel", "antiparallel", "near_pi")


def loss_fn(chunk_size: Optional[int] = None):
    fn = functools.partial(ak.arcface_loss, backend="cpp", chunk_size=chunk_size)
    fn.__name__ = f"arcface_loss[cpp cuda, chunk_size={chunk_size}]"
    return fn


def grid_dtypes(name: str):
    fp16 = [] if GRID[name].pattern in FP16_UNSAFE_PATTERNS else ["float16"]
    return ["float32", "bfloat16"] + fp16


@pytest.mark.parametrize("shape", RAGGED)
@pytest.mark.parametrize("name", GRID_NAMES)
def test_loss_grid_ragged(name, shape):
    """The checker's grid (loss, d embeddings, d weight against the float64 oracle, with
    its tolerances) at the ragged shapes, in float32, bfloat16 and float16."""
    check_margin_loss(loss_fn(), names=[name], shapes=[SHAPES[shape]],
                      dtypes=grid_dtypes(name), devices=[DEV], gradcheck=False).assert_ok()


CHUNK_NAMES = ["arcface_s64", "combined_m1", "smoothing", "reduction_none", "sub_centers",
               "linear_ce", "huge_norms"]


@pytest.mark.parametrize("chunk_size", [37, 130])
@pytest.mark.parametrize("shape", RAGGED)
@pytest.mark.parametrize("name", CHUNK_NAMES)
def test_loss_grid_small_chunks(name, shape, chunk_size):
    """The backward over several chunks of classes, the last one partial (C = 333, 197,
    150 in chunks of 37 or 130)."""
    check_margin_loss(loss_fn(chunk_size), names=[name], shapes=[SHAPES[shape]],
                      dtypes=grid_dtypes(name), devices=[DEV], gradcheck=False).assert_ok()


@pytest.mark.parametrize("name", ["arcface_s64", "sub_centers"])
def test_loss_grid_one_class_chunks(name):
    check_margin_loss(loss_fn(1), names=[name], shapes=[SHAPES["d72"]],
                      dtypes=["float32", "float16", "bfloat16"], devices=[DEV],
                      gradcheck=False).assert_ok()


# --------------------------------------------------------- PartialFC, linear_cross_entropy
def assert_loss_grads(got, want, dtype: torch.dtype, names=("loss", "dx", "dw")):
    """(loss, gradients...) against float64 ones: the loss to FWD_TOL (floor 1), each
    gradient to grad_tol relative to its largest magnitude."""
    for name, a, b in zip(names, got, want):
        if name == "loss":
            assert_close(name, a, b, FWD_TOL, floor=1.0)
        else:
            assert a.dtype == dtype, f"{name}: {a.dtype}"
            assert_close(name, a, b, grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
def test_partial_fc_sampling(dtype):
    """PartialFC (one device) with sample_rate < 1: the kernels read the sampled rows of
    the weight through the index; loss and gradients equal the float64 softmax over the
    sampled classes, and rows outside the sample get exactly 0."""
    n, c, d = 200, 3001, 72
    x, w, y = make_inputs(n, c, d, seed=7)
    head = ak.PartialFC(d, c, sample_rate=0.3, backend="cpp", device=DEV, dtype=dtype,
                        generator=torch.Generator(device=DEV).manual_seed(0))
    with torch.no_grad():
        head.weight.copy_(w.to(dtype))
    xl = x.to(DEV, dtype).requires_grad_(True)
    y = y.to(DEV)
    loss = head(xl, y)
    loss.backward()
    index = head.weight_index
    assert index is not None and index.numel() == head.num_sample
    assert torch.isin(y[y >= 0], index).all()        # every positive is sampled
    x64 = xl.detach().double().requires_grad_(True)
    w64 = head.weight.detach().double().requires_grad_(True)
    y_ref = torch.where(y >= 0, torch.searchsorted(index, y.clamp(min=0)), y)
    ref = reference_loss(x64, w64[index], y_ref)
    ref.backward()
    assert_loss_grads((loss.detach(), xl.grad, head.weight.grad),
                      (ref.detach(), x64.grad, w64.grad), dtype)
    outside = torch.ones(c, dtype=torch.bool, device=DEV)
    outside[index] = False
    assert (head.weight.grad[outside] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("variant", ["plain", "bias_softcap_zloss"])
def test_linear_cross_entropy(variant, dtype):
    """linear_cross_entropy (normalize=False, s = 1: the fused kernels for 16-bit plain,
    the terms kernels with a bias and a soft cap) with shift and ignored positions, against
    float64 torch: cross_entropy of softcap(e c^T + bias) plus z_loss lse^2."""
    b, t, d, v = 3, 67, 72, 1001
    g = torch.Generator().manual_seed(8)
    e = torch.randn(b, t, d, generator=g, dtype=torch.float64) * 0.5
    c = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, v, (b, t), generator=g)
    y[:, ::5] = -100
    extra = variant != "plain"
    bias = torch.randn(v, generator=g, dtype=torch.float64) if extra else None
    kw = dict(softcap=30.0, z_loss=1e-3, chunk_size=300) if extra else {}
    el = e.to(DEV, dtype).requires_grad_(True)
    cl = c.to(DEV, dtype).requires_grad_(True)
    bl = bias.to(DEV, dtype).requires_grad_(True) if extra else None
    y = y.to(DEV)
    loss = ak.linear_cross_entropy(el, cl, y, bias=bl, shift=1, backend="cpp", **kw)
    loss.backward()

    e64, c64 = (tt.detach().double().requires_grad_(True) for tt in (el, cl))
    b64 = bl.detach().double().requires_grad_(True) if extra else None
    logits = e64[:, :-1].reshape(-1, d) @ c64.T
    if extra:
        logits = logits + b64
        logits = 30.0 * torch.tanh(logits / 30.0)
    yy = y[:, 1:].reshape(-1)
    valid = yy != -100
    rows = F.cross_entropy(logits, yy, ignore_index=-100, reduction="none")
    if extra:
        rows = rows + 1e-3 * torch.logsumexp(logits, dim=1) ** 2
    ref = torch.where(valid, rows, torch.zeros_like(rows)).sum() / valid.sum()
    ref.backward()
    got = (loss.detach(), el.grad, cl.grad) + ((bl.grad,) if extra else ())
    want = (ref.detach(), e64.grad, c64.grad) + ((b64.grad,) if extra else ())
    assert_loss_grads(got, want, dtype, names=("loss", "de", "dc", "dbias"))


# ------------------------------------------------------------------------ huge norms
X_SCALE, W_SCALE = 2.0 ** 100, 2.0 ** 83   # norms ~1e31 and ~1e26, far above 2^63;
# powers of two: exact in bfloat16 / float32 (float16 cannot hold them)
PATHS = {"fused_bf16": (torch.bfloat16, 72, 1), "general_bf16": (torch.bfloat16, 70, 1),
         "general_fp32": (torch.float32, 72, 1), "k3_bf16": (torch.bfloat16, 72, 3)}


@pytest.mark.parametrize("scaled", ["x_rows", "w_row", "both"])
@pytest.mark.parametrize("path", list(PATHS))
def test_huge_norms(path, scaled):
    """Rows of x scaled to ~1e31 and a target's row of w to ~1e26 (norms above 2^63 set
    the device flag that moves every kernel to the overflow-free path). The loss sees
    only directions: the forward equals the reference's of the unscaled inputs, and dx
    (dw) rows are the unscaled ones over the scale; all finite, every row checked, the
    scaled rows also against their own magnitude."""
    dtype, d, k = PATHS[path]
    n, c = 150, 333
    inp = op_inputs(n, c, d, k=k, seed=9)
    cfg = MarginConfig(sub_centers=k)
    args = cfg.op_args() + (0.0, 0)
    xl, wl = inp.x.to(dtype), inp.w.to(dtype)
    rows = torch.tensor([3, 77, n - 1], device=DEV)
    wrow = int(inp.labels[3]) * k          # a row of the target class of row 3
    assert wrow >= 0
    xb, wb = xl.clone(), wl.clone()
    if scaled in ("x_rows", "both"):
        xb[rows] *= X_SCALE
    if scaled in ("w_row", "both"):
        wb[wrow] *= W_SCALE
    assert torch.isfinite(xb).all() and torch.isfinite(wb).all()
    x64, w64 = xl.double(), wl.double()
    want = REF_FWD(x64, w64, inp.labels, None, None, *args)
    # the premise, in the reference itself: the scale changes nothing
    for a, b in zip(REF_FWD(xb.double(), wb.double(), inp.labels, None, None, *args)[:4],
                    want[:4]):
        assert torch.isfinite(a).all() and rel_err(a, b, 1.0) < 1e-10
    got = _cpp.FWD_OP(xb, wb, inp.labels, None, None, *args)
    assert_fwd_matches(got, want, x64, w64, None, None, cfg)
    lse = want[0].float()
    rdx, rdw, _ = REF_BWD(x64, w64, inp.labels, None, None, lse.double(),
                          *(t.double() for t in inp.coeffs), *args)
    dx, dw, _ = _cpp.BWD_OP(xb, wb, inp.labels, None, None, lse, *inp.coeffs, *args)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    dx, dw = dx.double(), dw.double()
    if scaled in ("x_rows", "both"):
        dx[rows] *= X_SCALE
    if scaled in ("w_row", "both"):
        dw[wrow] *= W_SCALE
    tol = grad_tol(dtype)
    assert_close("dx", dx, rdx, tol)
    assert_close("dw", dw, rdw, tol)
    assert_close("dx of the huge rows", dx[rows], rdx[rows], tol)
    assert_close("dw of the huge row", dw[wrow], rdw[wrow], tol)


# --------------------------------------------------------------------------- NaN row
NAN_PATHS = {"fused_bf16": (torch.bfloat16, 72), "fused_fp16": (torch.float16, 72),
             "general_bf16": (torch.bfloat16, 70), "general_fp32": (torch.float32, 72)}


@pytest.mark.parametrize("path", list(NAN_PATHS))
def test_nan_row(path):
    """A NaN in one row of x: that row's lse, target, sum_z and loss are NaN, every other
    row is finite and equal to the reference; dx is NaN on that row only, dw NaN where the
    reference's is (every row: each class's gradient sums over all rows)."""
    dtype, d = NAN_PATHS[path]
    n, c = SHAPES["d72"][:2]
    inp = op_inputs(n, c, d, seed=10)
    bad = 7
    assert int(inp.labels[bad]) >= 0
    x = inp.x.clone()
    x[bad, 5] = math.nan
    xl, wl = x.to(dtype), inp.w.to(dtype)
    x64, w64 = xl.double(), wl.double()
    cfg = MarginConfig()
    args = cfg.op_args() + (0.0, 0)
    ok = torch.ones(n, dtype=torch.bool, device=DEV)
    ok[bad] = False

    want = REF_FWD(x64, w64, inp.labels, None, None, *args)
    got = _cpp.FWD_OP(xl, wl, inp.labels, None, None, *args)
    for name, a in zip(("lse", "target", "sum_z"), got[:3]):
        assert torch.isnan(a[bad]), name
    assert_fwd_matches(got, want, x64, w64, None, None, cfg, rows=ok)

    y = torch.where(inp.labels >= 0, inp.labels, torch.full_like(inp.labels, -100))
    loss = ak.arcface_loss(xl, wl, y, backend="cpp", reduction="none")
    ref = reference_loss(x64, w64, y, reduction="none")
    assert torch.isnan(loss[bad]) and torch.isnan(ref[bad])
    assert_close("loss", loss[ok], ref[ok], FWD_TOL, floor=1.0)

    lse = want[0].float()   # NaN on the bad row
    rdx, rdw, _ = REF_BWD(x64, w64, inp.labels, None, None, lse.double(),
                          *(t.double() for t in inp.coeffs), *args)
    dx, dw, _ = _cpp.BWD_OP(xl, wl, inp.labels, None, None, lse, *inp.coeffs, *args)
    assert torch.isnan(dx[bad]).all() and torch.isnan(rdx[bad]).all()
    assert_close("dx", dx[ok], rdx[ok], grad_tol(dtype))
    assert torch.equal(torch.isnan(dw), torch.isnan(rdw))


# ---------------------------------------------------------------------- determinism
# name: (dtype, K, indexed, terms)
DET = {"fused_bf16": (torch.bfloat16, 1, False, False),
       "fused_fp16_index": (torch.float16, 1, True, False),
       "general_fp32": (torch.float32, 1, False, False),
       "general_bf16_k3_index": (torch.bfloat16, 3, True, False),
       "terms_bf16_index": (torch.bfloat16, 1, True, True)}


@pytest.mark.parametrize("block", [0, 1000])
@pytest.mark.parametrize("config", list(DET))
def test_bitwise_deterministic(config, block):
    """Two runs give bitwise the same forward outputs, dx, dw and dbias (no atomics; the
    index repeats a class at most twice, where index_add_'s order cannot matter)."""
    dtype, k, indexed, terms = DET[config]
    inp = op_inputs(*SHAPES["wide"], k=k, indexed=indexed, bias=terms, seed=11)
    cfg = MarginConfig(sub_centers=k, softcap=20.0 if terms else None)
    args = cfg.op_args() + (0.0, block)
    x, w, b = inp.x.to(dtype), inp.w.to(dtype), _cast(inp.bias, dtype)

    def run():
        fwd = _cpp.FWD_OP(x, w, inp.labels, inp.index, b, *args)
        return fwd + _cpp.BWD_OP(x, w, inp.labels, inp.index, b, fwd[0], *inp.coeffs, *args)

    first, second = run(), run()
    assert torch.isfinite(first[5]).all() and torch.isfinite(first[6]).all()
    names = ("lse", "target", "sum_z", "max_z", "argmax", "dx", "dw", "dbias")
    for name, a, b2 in zip(names, first, second):
        assert torch.equal(a, b2), f"{name} differs between two runs"


# ------------------------------------------------------------------ CUDA-graph capture
def capture(step):
    """A CUDA graph of step() (after a warm-up on a side stream, as torch.cuda.graph's
    documentation does) and its static outputs. Capture fails on any host sync."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


GRAPHS = {  # name: (dtype, D, K, the settings; API: arcface_loss, else the ops directly)
    "api_fused_bf16": (torch.bfloat16, 72, 1, dict(chunk_size=37)),
    "api_general_fp32_k3": (torch.float32, 72, 3, dict(label_smoothing=0.1, chunk_size=100)),
    "op_fused_fp16_index": (torch.float16, 72, 1, dict(indexed=True)),
    "op_terms_bf16_index_bias": (torch.bfloat16, 72, 1, dict(indexed=True, bias=True,
                                                             softcap=20.0)),
}


@pytest.mark.parametrize("config", list(GRAPHS))
def test_cuda_graph_capture(config):
    """A forward + backward step with backend='cpp' is captured in a CUDA graph (so it
    makes no host sync) and its replays, on new inputs copied into the static ones,
    equal eager runs on those inputs (forward bitwise; gradients to the dtype's
    rounding)."""
    dtype, d, k, settings = GRAPHS[config]
    n, c = SHAPES["d72"][:2]
    api = config.startswith("api")
    indexed, has_bias = settings.get("indexed", False), settings.get("bias", False)
    a, b = (op_inputs(n, c, d, k=k, indexed=indexed, bias=has_bias, seed=s)
            for s in (20, 21))
    if indexed:  # one index for both (static); labels are positions in it
        b = b._replace(index=a.index)
    static = OpInputs(a.x.to(dtype), a.w.to(dtype), a.labels.clone(), a.index,
                      _cast(a.bias, dtype), tuple(t.clone() for t in a.coeffs))
    cfg = MarginConfig(sub_centers=k, softcap=settings.get("softcap"))
    args = cfg.op_args() + (0.0, settings.get("block", 0))
    xs, ws = static.x.requires_grad_(api), static.w.requires_grad_(api)
    ys = torch.where(static.labels >= 0, static.labels, torch.full_like(static.labels, -100))
    loss_kw = {key: v for key, v in settings.items() if key in ("chunk_size",
                                                               "label_smoothing")}

    def step():
        if api:
            loss = ak.arcface_loss(xs, ws, ys, backend="cpp", sub_centers=k, **loss_kw)
            return (loss,) + torch.autograd.grad(loss, (xs, ws))
        fwd = _cpp.FWD_OP(xs, ws, static.labels, static.index, static.bias, *args)
        return fwd + _cpp.BWD_OP(xs, ws, static.labels, static.index, static.bias, fwd[0],
                                 *static.coeffs, *args)

    def load(inp: OpInputs):
        with torch.no_grad():
            xs.copy_(inp.x.to(dtype))
            ws.copy_(inp.w.to(dtype))
            static.labels.copy_(inp.labels)
            ys.copy_(torch.where(inp.labels >= 0, inp.labels,
                                 torch.full_like(inp.labels, -100)))
            for dst, src in zip(static.coeffs, inp.coeffs):
                dst.copy_(src)
            if static.bias is not None:
                static.bias.copy_(inp.bias.to(dtype))

    graph, out = capture(step)
    n_fwd = 1 if api else 5
    results = {}
    for name, inp in (("a", a), ("b", b)):
        load(inp)
        graph.replay()
        replayed = tuple(t.clone() for t in out)
        eager = tuple(t.detach() for t in step())
        torch.cuda.synchronize()
        for i, (r, e) in enumerate(zip(replayed, eager)):
            assert torch.isfinite(r.double()).all()
            if i < n_fwd:
                assert torch.equal(r, e), f"replay {name}: output {i} differs from eager"
            elif e.numel():   # cuBLAS under capture may sum in another order: an ulp
                tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
                assert rel_err(r, e) <= tol, f"replay {name}: output {i}"
        results[name] = replayed
    assert not torch.equal(results["a"][0], results["b"][0]), \
        "the replay did not see the new inputs"


# ------------------------------------------------------------- beyond 2^31 logits (slow)
def reference_fwd_by_chunks(xl: Tensor, wl: Tensor, labels: Tensor, cfg: MarginConfig,
                            chunk: int = 8192):
    """The reference forward op in float64 on the rounded inputs (K = 1, no index), over
    chunks of classes so that no N x C matrix exists: lse the logsumexp of the chunks',
    target and sum_z their sums, max_z / argmax the first maximum."""
    args = cfg.op_args() + (0.0, 0)
    x64 = xl.double()
    n, c = xl.shape[0], wl.shape[0]
    lses, target, sum_z = [], torch.zeros(n, dtype=torch.float64, device=DEV), \
        torch.zeros(n, dtype=torch.float64, device=DEV)
    best = torch.full((n,), -math.inf, dtype=torch.float64, device=DEV)
    arg = torch.zeros(n, dtype=torch.long, device=DEV)
    for c0 in range(0, c, chunk):
        c1 = min(c, c0 + chunk)
        inside = (labels >= c0) & (labels < c1)
        lab = torch.where(inside, labels - c0, torch.full_like(labels, -1))
        lse, tgt, sz, mz, am = REF_FWD(x64, wl[c0:c1].double(), lab, None, None, *args)
        lses.append(lse)
        target += tgt
        sum_z += sz
        better = mz > best
        best = torch.where(better, mz, best)
        arg = torch.where(better, am + c0, arg)
    return torch.logsumexp(torch.stack(lses), dim=0), target, sum_z, best, arg


def reference_bwd_by_chunks(xl: Tensor, wl: Tensor, labels: Tensor, cfg: MarginConfig,
                            lse: Tensor, coeffs, chunk: int = 8192):
    """The reference backward op in float64 over chunks of classes (exact: the backward
    is a sum over classes given lse). Yields (c0, c1, the chunk's part of dx, dw rows
    c0 .. c1), each class's gradient being its own."""
    args = cfg.op_args() + (0.0, 0)
    x64 = xl.double()
    coeffs = [t.double() for t in coeffs]
    for c0 in range(0, wl.shape[0], chunk):
        c1 = min(wl.shape[0], c0 + chunk)
        inside = (labels >= c0) & (labels < c1)
        lab = torch.where(inside, labels - c0, torch.full_like(labels, -1))
        gx, gw, _ = REF_BWD(x64, wl[c0:c1].double(), lab, None, None, lse.double(), *coeffs,
                            *args)
        yield c0, c1, gx, gw


def check_huge_problem(n: int, c: int, d: int, dtype: torch.dtype, seed: int = 0):
    """Random ArcFace inputs at (n, c, d): every forward output of every row against the
    chunk-wise reference; dx of every row and dw of every class for two sets of row
    coefficients (a loss with smoothing, and the softmax part alone), dw compared
    separately on the target classes and on the others (whose gradient is the softmax
    part only, orders of magnitude smaller)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    xl = torch.randn(n, d, device=DEV, generator=g).to(dtype)
    wl = torch.randn(c, d, device=DEV, generator=g).to(dtype)
    labels = torch.randint(0, c, (n,), device=DEV, generator=g)
    labels[0], labels[1], labels[-1] = 0, -1, c - 1   # first class, none, the last logit
    cfg = MarginConfig()
    args = cfg.op_args() + (0.0, 0)
    got = _cpp.FWD_OP(xl, wl, labels, None, None, *args)
    want = reference_fwd_by_chunks(xl, wl, labels, cfg)
    assert_fwd_matches(got, want, xl, wl, None, None, cfg)

    lse = got[0]   # any lse is an input of the backward: both get these values
    g_p = (torch.rand(n, device=DEV, generator=g) + 0.5) / n
    zero = torch.zeros_like(g_p)
    coeff_sets = {"loss": (g_p, -0.9 * g_p, -0.1 * g_p / c), "softmax": (g_p, zero, zero)}
    targets = torch.zeros(c, dtype=torch.bool, device=DEV)
    targets[labels[labels >= 0]] = True
    tol = grad_tol(dtype)
    for what, coeffs in coeff_sets.items():
        dx, dw, _ = _cpp.BWD_OP(xl, wl, labels, None, None, lse, *coeffs, *args)
        assert dx.dtype == dtype and dw.dtype == dtype
        assert torch.isfinite(dx).all() and torch.isfinite(dw).all(), what
        rdx = torch.zeros(n, d, dtype=torch.float64, device=DEV)
        diff = torch.empty(c, dtype=torch.float64, device=DEV)
        mag = torch.empty(c, dtype=torch.float64, device=DEV)
        for c0, c1, gx, gw in reference_bwd_by_chunks(xl, wl, labels, cfg, lse, coeffs):
            rdx += gx
            diff[c0:c1] = (dw[c0:c1].double() - gw).abs().amax(dim=1)
            mag[c0:c1] = gw.abs().amax(dim=1)
        assert_close(f"{what}: dx", dx, rdx, tol)
        for group, mask in (("target", targets), ("non-target", ~targets)):
            err = (diff[mask].max() / mag[mask].max()).item()
            assert err <= tol, f"{what}: dw of the {group} classes: error {err:.3e} > {tol:.1e}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dt_id)
def test_more_than_2_31_logits(dtype):
    """N C = 2.19e9 > 2^31 (bfloat16: the fused kernels; float32: the general ones)."""
    n, c, d = 2304, 950_000, 64
    assert n * c > 2 ** 31
    check_huge_problem(n, c, d, dtype, seed=1)


@pytest.mark.slow
def test_million_classes():
    """The headline shape N = 1024, C = 2^20, D = 512 in bfloat16 (fused kernels; the
    backward in 128 chunks of the 16 MiB workspace)."""
    check_huge_problem(1024, 1 << 20, 512, torch.bfloat16, seed=2)
