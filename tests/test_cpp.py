"""The "cpp" backend: the compiled extension arcface_kernels._C (csrc/).

CPU kernel against the float64 reference over the shared grid (every mode, odd shapes) in
float64 and float32, half precision against the reference's own error, gradcheck, the
build's devices and constants, the scalar checks, the memory contract; the CUDA kernel in
tests marked gpu. The op-level tests shared by every backend (registration, opcheck,
index, empty shards, blocks, extreme input, NaN, bad tensors) are in test_ops.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels import chunked
from arcface_kernels._config import GRAD_MODES, WRAP_MODES, MarginConfig
from arcface_kernels.reference import (NORM_EPS, SIN2_MIN, reference_forward,
                                       reference_logits)

from _cases import MODES, assert_matches_reference, make_inputs, max_rel_err

_cpp = pytest.importorskip("arcface_kernels._cpp",
                           reason="the C++ extension arcface_kernels._C is not built")
HAS_CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------- registry
def test_devices_match_build():
    assert _cpp.DEVICES == (("cpu", "cuda") if _cpp.WITH_CUDA else ("cpu",))


def test_constants_match_python():
    from arcface_kernels import _C
    assert _C.WRAP_FALLBACK == WRAP_MODES["fallback"]
    assert _C.WRAP_EASY == WRAP_MODES["easy"]
    assert _C.WRAP_NONE == WRAP_MODES["none"]
    assert _C.GRAD_EXACT == GRAD_MODES["exact"]
    assert _C.GRAD_STRAIGHT_THROUGH == GRAD_MODES["straight_through"]
    assert _C.NORM_EPS == NORM_EPS and _C.SIN2_MIN == SIN2_MIN


def test_package_works_without_extension(tmp_path):
    """With arcface_kernels._C unimportable the package imports, reports cpp unavailable
    and runs the loss with another backend."""
    code = (
        "import sys; sys.modules['arcface_kernels._C'] = None\n"
        "import torch, arcface_kernels as ak\n"
        "st = ak.backend_status()\n"
        "assert st['cpp'].startswith('unavailable'), st\n"
        "assert 'cpp' not in ak.available_backends()\n"
        "x, w = torch.randn(4, 8), torch.randn(5, 8)\n"
        "l = ak.arcface_loss(x, w, torch.tensor([0, 1, 2, 3]))\n"
        "assert torch.isfinite(l)\n"
        "print('OK')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------- CPU vs reference
def test_cpu_many_row_tiles():
    """More rows than one tile holds (2^19 / (2048 w-rows) = 256 rows per tile)."""
    assert_matches_reference("cpp", (1100, 2100, 5), MODES["arcface"], dtype=torch.float64)


# ------------------------------------------- oracle of the GPU tests (index, chunks)
def reference_backward(x, w, labels, index, g_p, g_t, g_s, cfg):
    """The backward primitive by autograd through the reference's materialized logits:
    the gradient of sum_i g_p_i lse_i + g_t_i z_i,label + g_s_i sum_j z_ij."""
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    z, _ = reference_logits(xr, wr, labels, index, cfg)
    has = labels >= 0
    z_t = torch.where(has, z.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1),
                      torch.zeros_like(g_t))
    total = (g_p * torch.logsumexp(z, dim=1) + g_t * z_t + g_s * z.sum(dim=1)).sum()
    return torch.autograd.grad(total, (xr, wr))


def _op_args(mode: dict) -> tuple:
    cfg = MarginConfig(**{k: v for k, v in mode.items()
                          if k not in ("label_smoothing", "reduction")})
    return cfg, cfg.op_args() + (0.0,)   # grad_filter 0: the exact gradient


# ------------------------------------------------------------------------ bad input
def _good():
    x, w, y = make_inputs(5, 6, 4, dtype=torch.float32)
    labels = torch.where(y >= 0, y, torch.full_like(y, -1))
    return x, w, labels, MarginConfig().op_args() + (0.0,)


@pytest.mark.parametrize("case, exc, match", [
    ("wrap_mode", ValueError, "wrap_mode must be 0 .* got 7"),
    ("grad_mode", ValueError, "grad_mode must be 0 .* got -1"),
    ("s", ValueError, "s must be finite and > 0, got -1"),
    ("m2", ValueError, r"m2 must be in \[0, pi\), got 4"),
    ("linear_margin", ValueError, "normalize=False needs m1 == 1 and m2 == 0"),
    ("block", ValueError, "block must be >= 0"),
    ("grad_filter", ValueError, r"grad_filter must be in \[0, 1\) .*got 1.5"),
])
def test_bad_scalars(case, exc, match):
    """The scalar checks of csrc/ops.cpp (the tensor checks, shared by every backend, are
    in test_ops.py)."""
    x, w, labels, args = _good()
    args = list(args) + [0]
    if case == "wrap_mode":
        args[4] = 7
    elif case == "grad_mode":
        args[5] = -1
    elif case == "s":
        args[0] = -1.0
    elif case == "m2":
        args[2] = 4.0
    elif case == "linear_margin":
        args[6] = False
    elif case == "block":
        args[9] = -3
    elif case == "grad_filter":
        args[8] = 1.5
    with pytest.raises(exc, match=match):
        _cpp.FWD_OP(x, w, labels, None, *args)


def test_no_gradient_filter():
    """The C++ kernels compute the exact gradient: a filter is refused, not ignored, also
    through the loss (the op itself: test_ops.py::test_grad_filter)."""
    x, w, labels, args = _good()
    with pytest.raises(NotImplementedError, match="cpp backend"):
        ak.arcface_loss(x.requires_grad_(), w, labels.clamp(min=0), backend="cpp",
                        grad_filter_eps=1e-3).backward()


# -------------------------------------------------------------------- memory contract
def test_cpu_memory_is_not_n_by_c():
    from arcface_kernels._memory import peak_memory
    n, c, d = 256, 16384, 32
    x, w, y = make_inputs(n, c, d, dtype=torch.float32, aligned=False)

    def step():
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = ak.arcface_loss(xr, wr, y, backend="cpp")
        loss.backward()
        return loss

    step()
    peak, _ = peak_memory(step, "cpu")
    grads_and_copies = 2 * (n * d + c * d) * 4  # the clones and their gradients
    assert peak - grads_and_copies < 0.25 * n * c * 4, peak


# ------------------------------------------------------------------------------- CUDA
needs_cuda_kernel = pytest.mark.skipif(not _cpp.WITH_CUDA,
                                       reason="extension built without CUDA kernels")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("k", [1, 3])
def test_cuda_index_matches_reference(k):
    n, c, d = 70, 300, 40
    x, w, _ = make_inputs(n, c, d, sub_centers=k, seed=5)
    index = torch.randperm(c)[:130]
    index[7] = index[100]  # a repeated class
    labels = torch.randint(-1, index.numel(), (n,))
    cfg, args = _op_args(dict(MODES["arcface"], sub_centers=k))
    want = reference_forward(x, w, labels, index, cfg)
    xc, wc, lc, ic = (t.cuda() for t in (x, w, labels, index))
    got = _cpp.FWD_OP(xc.float(), wc.float(), lc, ic, *args, 0)
    for g, r in zip(got[:4], want[:4]):
        assert max_rel_err(g, r) < 2e-5
    g_p, g_t, g_s = torch.rand(n, dtype=x.dtype), -torch.rand(n, dtype=x.dtype), \
        torch.rand(n, dtype=x.dtype) * 0.1
    rdx, rdw = reference_backward(x, w, labels, index, g_p, g_t, g_s, cfg)
    dx, dw = _cpp.BWD_OP(xc.float(), wc.float(), lc, ic, want[0].float().cuda(),
                         g_p.float().cuda(), g_t.float().cuda(), g_s.float().cuda(), *args, 0)
    assert max_rel_err(dx, rdx) < 2e-4 and max_rel_err(dw, rdw) < 2e-4


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["arcface", "sub_centers", "linear_ce"])
def test_cuda_backward_chunks_half(mode, dtype):
    """16-bit: the backward with many small chunks agrees with one chunk (each chunk's
    G W product is rounded to the input dtype before the fp32 accumulation) and with
    the float64 reference to the dtype's precision."""
    n, c, d = 150, 300, 40
    k = MODES[mode].get("sub_centers", 1)
    x, w, y = make_inputs(n, c, d, sub_centers=k, seed=6)
    y = torch.where(y >= 0, y, -1)  # ignored rows -> "no target here" (the op's -1)
    cfg, args = _op_args(MODES[mode])
    lse = reference_forward(x, w, y, None, cfg)[0]
    g_p = torch.rand(n, dtype=x.dtype) + 0.5
    g_t, g_s = -g_p, torch.rand(n, dtype=x.dtype) * 0.01
    rdx, rdw = reference_backward(x, w, y, None, g_p, g_t, g_s, cfg)
    xc, wc = x.to("cuda", dtype), w.to("cuda", dtype)
    vecs = [v.float().cuda() for v in (lse, g_p, g_t, g_s)]
    one = _cpp.BWD_OP(xc, wc, y.cuda(), None, *vecs, *args, 0)
    many = _cpp.BWD_OP(xc, wc, y.cuda(), None, *vecs, *args, 7)
    tol = 8 * torch.finfo(dtype).eps
    for a, b, r in zip(one, many, (rdx, rdw)):
        assert a.dtype == dtype and torch.isfinite(a).all() and torch.isfinite(b).all()
        assert max_rel_err(a, r) < tol and max_rel_err(b, r) < tol
        assert max_rel_err(b, a) < tol


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("block", [1, 7])
def test_cuda_index_many_chunks(k, block):
    """Partial FC index with repeated classes, in one chunk and across chunks (dw rows are
    index_added chunk by chunk); rows of w outside the index get exactly 0."""
    n, c, d = 70, 300, 40
    x, w, _ = make_inputs(n, c, d, sub_centers=k, seed=7)
    index = torch.randperm(c)[:40]
    index[3] = index[4]     # repeated within a chunk of 7
    index[30] = index[2]    # repeated across chunks
    labels = torch.randint(-1, index.numel(), (n,))
    cfg, args = _op_args(dict(MODES["arcface"], sub_centers=k))
    lse = reference_forward(x, w, labels, index, cfg)[0]
    g_p, g_t, g_s = torch.rand(n, dtype=x.dtype), -torch.rand(n, dtype=x.dtype), \
        torch.rand(n, dtype=x.dtype) * 0.1
    rdx, rdw = reference_backward(x, w, labels, index, g_p, g_t, g_s, cfg)
    dx, dw = _cpp.BWD_OP(x.float().cuda(), w.float().cuda(), labels.cuda(), index.cuda(),
                         *(v.float().cuda() for v in (lse, g_p, g_t, g_s)), *args, block)
    assert max_rel_err(dx, rdx) < 2e-4 and max_rel_err(dw, rdw) < 2e-4
    untouched = torch.ones(c, dtype=torch.bool)
    untouched[index] = False
    assert dw.view(c, k, d)[untouched.cuda()].abs().max() == 0


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_backward_memory_is_bounded():
    """The CUDA backward holds a bounded G workspace (<= 16 MiB) and O(N D + C) more,
    never N x C values (here N C in fp16 is 410 MB)."""
    from arcface_kernels._memory import peak_memory
    n, c, d = 2048, 100_000, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float16)
    w = torch.randn(c, d, device="cuda", generator=g, dtype=torch.float16)
    y = torch.randint(0, c, (n,), device="cuda", generator=g)
    args = MarginConfig().op_args() + (0.0, 0)
    lse = _cpp.FWD_OP(x, w, y, None, *args)[0]
    ones = torch.ones(n, device="cuda")

    def step():
        return _cpp.BWD_OP(x, w, y, None, lse, ones / n, -ones / n, ones * 0, *args)

    step()  # cuBLAS workspace and the like
    peak, (dx, dw) = peak_memory(step, "cuda")
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    outputs = (n * d + c * d) * 2
    assert peak - outputs < 64 * 2 ** 20, peak
    assert peak - outputs < 0.25 * n * c * 2, peak


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_more_than_2_31_logits():
    """N * C > 2^31: 64-bit offsets. Checked against the chunked backend on the same GPU
    (the reference would need several 8 GiB copies of the logits)."""
    n, c, d = 40000, 54000, 16  # 2.16e9 logits
    assert n * c > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float16)
    w = torch.randn(c, d, device="cuda", generator=g, dtype=torch.float16)
    y = torch.randint(0, c, (n,), device="cuda", generator=g)
    y[-1] = c - 1  # the very last logit is a target
    args = MarginConfig().op_args() + (0.0, 0)
    got = _cpp.FWD_OP(x, w, y, None, *args)
    want = chunked.FWD_OP(x, w, y, None, *args)
    for a, b in zip(got[:4], want[:4]):
        assert max_rel_err(a, b) < 1e-3
    ones = torch.ones(n, device="cuda")
    dx, dw = _cpp.BWD_OP(x, w, y, None, want[0], ones / n, -ones / n, ones * 0, *args)
    rdx, rdw = chunked.BWD_OP(x, w, y, None, want[0], ones / n, -ones / n, ones * 0, *args)
    assert max_rel_err(dx, rdx) < 2e-2 and max_rel_err(dw, rdw) < 2e-2
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_bad_dtype_and_device():
    x, w, labels, args = _good()
    with pytest.raises(RuntimeError, match="float64"):
        _cpp.FWD_OP(x.double().cuda(), w.double().cuda(), labels.cuda(), None, *args, 0)
    with pytest.raises(ValueError, match="one device"):
        _cpp.FWD_OP(x.cuda(), w, labels, None, *args, 0)
