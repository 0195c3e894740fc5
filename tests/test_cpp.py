"""The "cpp" backend: the compiled extension arcface_kernels._C (csrc/).

CPU kernel against the float64 reference over the shared grid (every mode, odd shapes) in
float64 and float32, half precision against the reference's own error, gradcheck, the
build's devices and constants, the schemas, the scalar checks, the memory contract; the
terms bias / softcap / interclass filter against the reference ops (fwd outputs, dx, dw,
dbias) and their argument checks, and bitwise results across thread counts; the CUDA
kernel in tests marked gpu. The op-level tests shared by every backend (registration, opcheck,
index, empty shards, blocks, extreme input, NaN, bad tensors) are in test_ops.py.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels import chunked
from arcface_kernels._config import GRAD_MODES, WRAP_MODES, MarginConfig
from arcface_kernels._ops import BWD_SCHEMA, FWD_SCHEMA
from arcface_kernels.reference import (NORM_EPS, SIN2_MIN, reference_forward,
                                       reference_logits)

from _cases import MODES, assert_matches_reference, make_inputs, max_rel_err

_cpp = pytest.importorskip("arcface_kernels._cpp",
                           reason="the C++ extension arcface_kernels._C is not built")
HAS_CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------- registry
def test_devices_match_build():
    assert _cpp.DEVICES == (("cpu", "cuda") if _cpp.WITH_CUDA else ("cpu",))


def test_schemas_match_python():
    """The C++ m.def strings (csrc/ops.cpp) are _ops.FWD_SCHEMA / BWD_SCHEMA."""
    fwd = torch.ops.arcface_kernels.cpp_fwd.default._schema
    bwd = torch.ops.arcface_kernels.cpp_bwd.default._schema
    assert str(fwd) == f"arcface_kernels::cpp_fwd{FWD_SCHEMA}"
    assert str(bwd) == f"arcface_kernels::cpp_bwd{BWD_SCHEMA}"


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
def reference_backward(x, w, labels, index, g_p, g_t, g_s, cfg, bias=None):
    """The backward primitive by autograd through the reference's materialized logits:
    the gradient of sum_i g_p_i lse_i + g_t_i z_i,label + g_s_i sum_j z_ij; (dx, dw),
    and dbias when a bias is given."""
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    br = None if bias is None else bias.detach().clone().requires_grad_(True)
    z, _ = reference_logits(xr, wr, labels, index, cfg, br)
    has = labels >= 0
    z_t = torch.where(has, z.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1),
                      torch.zeros_like(g_t))
    total = (g_p * torch.logsumexp(z, dim=1) + g_t * z_t + g_s * z.sum(dim=1)).sum()
    return torch.autograd.grad(total, (xr, wr) if br is None else (xr, wr, br))


def _op_args(mode: dict) -> tuple:
    cfg = MarginConfig(**{k: v for k, v in mode.items()
                          if k not in ("label_smoothing", "reduction")})
    return cfg, cfg.op_args() + (0.0,)   # grad_filter 0: the exact gradient


# ------------------------------------------ bias, softcap, interclass filter (issue 12)
# the terms of a case: a bias (one value per class of w), softcap, interclass threshold
TERMS = {
    "bias": dict(bias=True),
    "softcap": dict(softcap=20.0),
    "interclass": dict(interclass=0.2),
    "bias_softcap": dict(bias=True, softcap=20.0),
    "bias_interclass": dict(bias=True, interclass=0.2),
    "softcap_interclass": dict(softcap=20.0, interclass=0.2),
    "all": dict(bias=True, softcap=20.0, interclass=0.2),
}
# (sub_centers, index): plain; sub-centers; a Partial FC index with repeated classes
LAYOUTS = {"plain": (1, False), "k2": (2, False), "index": (1, True), "k2_index": (2, True)}


def terms_case(terms: dict, k: int = 1, indexed: bool = False, *, n: int = 67, c: int = 45,
               d: int = 24, seed: int = 0, mode: str = "arcface", block: int = 0):
    """Inputs of one op call with the given terms, in float64: (x, w, labels, index,
    bias, cfg, scalar args after bias, (g_p, g_t, g_s)). Labels are shard positions or -1;
    the index repeats classes (within and across chunks)."""
    x, w, y = make_inputs(n, c, d, sub_centers=k, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    index = None
    if indexed:
        index = torch.randperm(c, generator=g)[: 2 * c // 3]
        index[1] = index[4]      # repeated close by (one chunk)
        index[-1] = index[2]     # and far apart (other chunks)
        labels = torch.randint(-1, index.numel(), (n,), generator=g)
    else:
        labels = torch.where(y >= 0, y, torch.full_like(y, -1))
    bias = (torch.randn(c, generator=g, dtype=torch.float64) * 2.0
            if terms.get("bias") else None)
    settings = {key: v for key, v in MODES[mode].items()
                if key not in ("label_smoothing", "reduction")}
    cfg = MarginConfig(**settings, sub_centers=k, softcap=terms.get("softcap"),
                       interclass_filtering_threshold=terms.get("interclass", 0.0))
    coeffs = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
              -torch.rand(n, generator=g, dtype=torch.float64),
              torch.rand(n, generator=g, dtype=torch.float64) * 0.1)
    return x, w, labels, index, bias, cfg, cfg.op_args() + (0.0, block), coeffs


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def check_terms_against_reference(terms, k, indexed, dtype, *, block=0, mode="arcface",
                                   **shape):
    x, w, labels, index, bias, cfg, args, (g_p, g_t, g_s) = terms_case(
        terms, k, indexed, block=block, mode=mode, **shape)
    ops = torch.ops.arcface_kernels
    want = ops.reference_fwd(x, w, labels, index, bias, *args)
    xd, wd, bd = _cast(x, dtype), _cast(w, dtype), _cast(bias, dtype)
    got = _cpp.FWD_OP(xd, wd, labels, index, bd, *args)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, b in zip(("lse", "target", "sum_z", "max_z"), got[:4], want[:4]):
        assert a.dtype == acc, name
        assert max_rel_err(a, b) < tol, (name, max_rel_err(a, b))
    if dtype == torch.float64:  # the top-1 class (a repeated class ties with itself up
        # to the rounding of its two dot products: compare class ids)
        ids = (lambda a: a) if index is None else (lambda a: index[a])
        assert torch.equal(ids(got[4]), ids(want[4]))
    rdx, rdw, rdb = ops.reference_bwd(x, w, labels, index, bias, want[0], g_p, g_t, g_s, *args)
    dx, dw, db = _cpp.BWD_OP(xd, wd, labels, index, bd, want[0].to(acc), g_p, g_t, g_s, *args)
    assert dx.dtype == dtype and dw.dtype == dtype
    for name, a, b in (("dx", dx, rdx), ("dw", dw, rdw)):
        assert max_rel_err(a, b) < tol, (name, max_rel_err(a, b))
    if bias is None:
        assert db.shape == (0,) and db.dtype == dtype
    else:
        assert db.shape == bias.shape and db.dtype == dtype
        assert max_rel_err(db, rdb) < tol, ("dbias", max_rel_err(db, rdb))
        if index is not None:  # classes outside the shard get exactly 0
            outside = torch.ones(bias.numel(), dtype=torch.bool)
            outside[index] = False
            assert (db[outside] == 0).all()
    return got, (dx, dw, db)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("terms", list(TERMS))
def test_terms_match_reference_ops(terms, layout, dtype):
    """Forward outputs and (dx, dw, dbias) against reference_fwd / reference_bwd."""
    k, indexed = LAYOUTS[layout]
    check_terms_against_reference(TERMS[terms], k, indexed, dtype)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("mode", ["cosface", "combined_m1", "easy", "straight_through"])
def test_terms_other_margins_and_chunks(mode, block):
    """Every term together with other margins / wrap modes, and small chunks (a class
    repeated in the index then has owners in different chunks and groups)."""
    check_terms_against_reference(TERMS["all"], 2, True, torch.float64, block=block,
                                  mode=mode)


@pytest.mark.parametrize("terms", ["bias", "bias_softcap"])
def test_terms_linear(terms):
    """normalize=False (unbounded logits, linear cross-entropy with a bias and a cap)."""
    check_terms_against_reference(TERMS[terms], 1, False, torch.float64, mode="linear_ce")
    check_terms_against_reference(TERMS[terms], 1, True, torch.float32, mode="linear_ce")


def test_terms_many_row_tiles():
    """More rows than one tile (256): dbias sums over several row tiles of a chunk."""
    check_terms_against_reference(TERMS["all"], 1, True, torch.float64, n=600, c=70, d=16)


def test_terms_match_autograd():
    """The same against plain autograd through the reference's logits (not the
    reference's closed-form backward), dbias included."""
    x, w, labels, index, bias, cfg, args, coeffs = terms_case(TERMS["all"], 2, True)
    lse = torch.ops.arcface_kernels.reference_fwd(x, w, labels, index, bias, *args)[0]
    want = reference_backward(x, w, labels, index, *coeffs, cfg, bias)
    got = _cpp.BWD_OP(x, w, labels, index, bias, lse, *coeffs, *args)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < 1e-10


def test_terms_off_equal_plain():
    """A zero bias and the filter / cap off take the general path; they agree with the
    plain path (no bias) to rounding, top-1 included."""
    x, w, labels, index, _, cfg, args, coeffs = terms_case({}, 2, True)
    zero = torch.zeros(w.shape[0] // 2, dtype=w.dtype)
    plain = _cpp.FWD_OP(x, w, labels, index, None, *args)
    general = _cpp.FWD_OP(x, w, labels, index, zero, *args)
    assert torch.equal(plain[4], general[4])
    for a, b in zip(plain[:4], general[:4]):
        assert max_rel_err(a, b) < 1e-13
    gp = _cpp.BWD_OP(x, w, labels, index, None, plain[0], *coeffs, *args)
    gg = _cpp.BWD_OP(x, w, labels, index, zero, plain[0], *coeffs, *args)
    for a, b in zip(gp[:2], gg[:2]):
        assert max_rel_err(a, b) < 1e-13


def test_terms_empty_shard_and_rows():
    """An empty index: lse = max_z = -inf (the cap does not turn -inf into -softcap),
    dbias 0; no rows: dbias 0."""
    x, w, labels, _, bias, cfg, args, coeffs = terms_case(TERMS["all"], 1, False, n=5)
    empty = torch.zeros(0, dtype=torch.long)
    none = torch.full_like(labels, -1)
    lse, tgt, sz, mz, am = _cpp.FWD_OP(x, w, none, empty, bias, *args)
    assert (lse == -math.inf).all() and (mz == -math.inf).all()
    assert (tgt == 0).all() and (sz == 0).all() and (am == 0).all()
    dx, dw, db = _cpp.BWD_OP(x, w, none, empty, bias, lse, *coeffs, *args)
    assert (dx == 0).all() and (dw == 0).all() and (db == 0).all()
    assert db.shape == bias.shape
    z = torch.zeros(0, dtype=x.dtype)
    dx, dw, db = _cpp.BWD_OP(x[:0], w, labels[:0], None, bias, z, z, z, z, *args)
    assert dx.shape == (0, x.shape[1]) and (db == 0).all() and db.shape == bias.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_terms_half(dtype):
    """16-bit inputs and bias: float32 statistics, gradients in the input dtype, close
    to the float64 reference at the dtype's precision."""
    x, w, labels, index, bias, cfg, args, coeffs = terms_case(TERMS["all"], 2, True)
    xl, wl, bl = x.to(dtype), w.to(dtype), bias.to(dtype)
    ops = torch.ops.arcface_kernels
    want = ops.reference_fwd(xl.double(), wl.double(), labels, index, bl.double(), *args)
    got = _cpp.FWD_OP(xl, wl, labels, index, bl, *args)
    for a, b in zip(got[:4], want[:4]):
        assert a.dtype == torch.float32 and max_rel_err(a, b) < 1e-4
    rgrads = ops.reference_bwd(xl.double(), wl.double(), labels, index, bl.double(),
                               want[0], *coeffs, *args)
    grads = _cpp.BWD_OP(xl, wl, labels, index, bl, got[0], *coeffs, *args)
    for a, b in zip(grads, rgrads):
        assert a.dtype == dtype and max_rel_err(a, b) < 8 * torch.finfo(dtype).eps


def test_terms_bitwise_across_threads():
    """With a bias (and the other terms), results are bitwise the same with 1 and 2
    threads: dbias is summed per shard position by the chunk's worker in row order and
    added into the classes in shard order."""
    x, w, labels, index, bias, cfg, args, coeffs = terms_case(
        TERMS["all"], 2, True, n=300, c=400, d=24)
    x, w, bias = x.float(), w.float(), bias.float()
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fwd = _cpp.FWD_OP(x, w, labels, index, bias, *args)
            runs.append(fwd + _cpp.BWD_OP(x, w, labels, index, bias, fwd[0], *coeffs, *args))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ bad input
def _good():
    x, w, y = make_inputs(5, 6, 4, dtype=torch.float32)
    labels = torch.where(y >= 0, y, torch.full_like(y, -1))
    return x, w, labels, MarginConfig().op_args() + (0.0,)


# positions of the scalars after (x, w, labels, index, bias)
S, M2, WRAP, GRAD, NORMALIZE, SOFTCAP, INTERCLASS, GRAD_FILTER, BLOCK = 0, 2, 4, 5, 6, 8, 9, \
    10, 11


@pytest.mark.parametrize("case, exc, match", [
    ("wrap_mode", ValueError, "wrap_mode must be 0 .* got 7"),
    ("grad_mode", ValueError, "grad_mode must be 0 .* got -1"),
    ("s", ValueError, "s must be finite and > 0, got -1"),
    ("m2", ValueError, r"m2 must be in \[0, pi\), got 4"),
    ("linear_margin", ValueError, "normalize=False needs m1 == 1 and m2 == 0"),
    ("block", ValueError, "block must be >= 0"),
    ("grad_filter", ValueError, r"grad_filter must be in \[0, 1\) .*got 1.5"),
    ("softcap", ValueError, r"softcap must be finite and >= 0 \(0 = off\), got -1"),
    ("softcap_inf", ValueError, r"softcap must be finite and >= 0 .*got inf"),
    ("interclass", ValueError, r"interclass must be finite and >= 0 \(0 = off\), got -0.5"),
    ("interclass_nan", ValueError, r"interclass must be finite and >= 0 .*got nan"),
])
def test_bad_scalars(case, exc, match):
    """The scalar checks of csrc/ops.cpp (the tensor checks, shared by every backend, are
    in test_ops.py), in the forward and the backward."""
    x, w, labels, args = _good()
    args = list(args) + [0]
    where, value = {"wrap_mode": (WRAP, 7), "grad_mode": (GRAD, -1), "s": (S, -1.0),
                    "m2": (M2, 4.0), "linear_margin": (NORMALIZE, False),
                    "block": (BLOCK, -3), "grad_filter": (GRAD_FILTER, 1.5),
                    "softcap": (SOFTCAP, -1.0), "softcap_inf": (SOFTCAP, math.inf),
                    "interclass": (INTERCLASS, -0.5),
                    "interclass_nan": (INTERCLASS, math.nan)}[case]
    args[where] = value
    with pytest.raises(exc, match=match):
        _cpp.FWD_OP(x, w, labels, None, None, *args)
    v = torch.zeros(x.shape[0])
    with pytest.raises(exc, match=match):
        _cpp.BWD_OP(x, w, labels, None, None, v, v, v, v, *args)


@pytest.mark.parametrize("case, exc, match", [
    ("long", ValueError, r"bias must have shape \[6\] \(one value per class of w.*got "
                         r"shape \[7\]"),
    ("per_row", ValueError, r"bias must have shape \[3\] .*sub_centers=2.*got shape \[6\]"),
    ("2d", ValueError, r"bias must have shape \[6\] .*got shape \[6, 1\]"),
    ("dtype", TypeError, "bias dtype must match w dtype Float, got Double"),
])
def test_bad_bias(case, exc, match):
    """bias: one value per class of w ([R / K], not per row, not per shard position), in
    w's dtype; forward and backward."""
    x, w, labels, args = _good()
    args = list(args) + [0]
    bias = torch.zeros(6)
    if case == "long":
        bias = torch.zeros(7)
    elif case == "per_row":
        args[7] = 2
        labels = labels.clamp(max=2)
    elif case == "2d":
        bias = torch.zeros(6, 1)
    elif case == "dtype":
        bias = torch.zeros(6, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        _cpp.FWD_OP(x, w, labels, None, bias, *args)
    v = torch.zeros(x.shape[0])
    with pytest.raises(exc, match=match):
        _cpp.BWD_OP(x, w, labels, None, bias, v, v, v, v, *args)


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
    got = _cpp.FWD_OP(xc.float(), wc.float(), lc, ic, None, *args, 0)
    for g, r in zip(got[:4], want[:4]):
        assert max_rel_err(g, r) < 2e-5
    g_p, g_t, g_s = torch.rand(n, dtype=x.dtype), -torch.rand(n, dtype=x.dtype), \
        torch.rand(n, dtype=x.dtype) * 0.1
    rdx, rdw = reference_backward(x, w, labels, index, g_p, g_t, g_s, cfg)
    dx, dw, db = _cpp.BWD_OP(xc.float(), wc.float(), lc, ic, None, want[0].float().cuda(),
                             g_p.float().cuda(), g_t.float().cuda(), g_s.float().cuda(), *args,
                             0)
    assert db.shape == (0,) and db.device == dx.device
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
    one = _cpp.BWD_OP(xc, wc, y.cuda(), None, None, *vecs, *args, 0)[:2]
    many = _cpp.BWD_OP(xc, wc, y.cuda(), None, None, *vecs, *args, 7)[:2]
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
    dx, dw, _ = _cpp.BWD_OP(x.float().cuda(), w.float().cuda(), labels.cuda(), index.cuda(),
                            None, *(v.float().cuda() for v in (lse, g_p, g_t, g_s)), *args,
                            block)
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
    lse = _cpp.FWD_OP(x, w, y, None, None, *args)[0]
    ones = torch.ones(n, device="cuda")

    def step():
        return _cpp.BWD_OP(x, w, y, None, None, lse, ones / n, -ones / n, ones * 0, *args)[:2]

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
    got = _cpp.FWD_OP(x, w, y, None, None, *args)
    want = chunked.FWD_OP(x, w, y, None, None, *args)
    for a, b in zip(got[:4], want[:4]):
        assert max_rel_err(a, b) < 1e-3
    ones = torch.ones(n, device="cuda")
    dx, dw, _ = _cpp.BWD_OP(x, w, y, None, None, want[0], ones / n, -ones / n, ones * 0,
                            *args)
    rdx, rdw, _ = chunked.BWD_OP(x, w, y, None, None, want[0], ones / n, -ones / n,
                                 ones * 0, *args)
    assert max_rel_err(dx, rdx) < 2e-2 and max_rel_err(dw, rdw) < 2e-2
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_bad_dtype_and_device():
    x, w, labels, args = _good()
    with pytest.raises(RuntimeError, match="float64"):
        _cpp.FWD_OP(x.double().cuda(), w.double().cuda(), labels.cuda(), None, None, *args, 0)
    with pytest.raises(ValueError, match="one device"):
        _cpp.FWD_OP(x.cuda(), w, labels, None, None, *args, 0)
    with pytest.raises(ValueError, match="bias must be on x's device"):
        _cpp.FWD_OP(x.cuda(), w.cuda(), labels.cuda(), None, torch.zeros(6), *args, 0)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block", [0, 7])
@pytest.mark.parametrize("k, indexed", [(1, False), (3, True)])
@pytest.mark.parametrize("terms", ["bias", "softcap_interclass", "all"])
def test_cuda_terms_match_reference(terms, k, indexed, block, dtype):
    """CUDA kernel with bias / softcap / interclass: forward outputs and (dx, dw, dbias)
    against the float64 reference ops, over row tiles with a partial last one (N = 150),
    one chunk or many (block 7: dbias per chunk, repeated classes across chunks); and
    bitwise the same on a second run."""
    x, w, labels, index, bias, cfg, args, coeffs = terms_case(
        TERMS[terms], k, indexed, n=150, c=300, d=40, block=block)
    ops = torch.ops.arcface_kernels
    want = ops.reference_fwd(x, w, labels, index, bias, *args)
    rgrads = ops.reference_bwd(x, w, labels, index, bias, want[0], *coeffs, *args)
    dev = lambda t: None if t is None else t.cuda()   # noqa: E731
    xc, wc, bc = dev(x).to(dtype), dev(w).to(dtype), None if bias is None else dev(bias).to(dtype)
    lc, ic = labels.cuda(), dev(index)
    got = _cpp.FWD_OP(xc, wc, lc, ic, bc, *args)
    ftol = 2e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got[:4], want[:4]):
        assert max_rel_err(a, b) < ftol
    vecs = [want[0].float().cuda()] + [v.float().cuda() for v in coeffs]
    grads = _cpp.BWD_OP(xc, wc, lc, ic, bc, *vecs, *args)
    again = _cpp.BWD_OP(xc, wc, lc, ic, bc, *vecs, *args)
    gtol = 2e-4 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
    for name, a, b, c2 in zip(("dx", "dw", "dbias"), grads, rgrads, again):
        assert torch.equal(a, c2), name
        if bias is None and name == "dbias":
            assert a.shape == (0,)
            continue
        assert a.dtype == dtype and max_rel_err(a, b) < gtol, (name, max_rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_huge_norms(dtype):
    """Rows whose sum of squares overflows the float accumulator (norm 2^100 for x, 2^70
    for a row of w; powers of two, exact in either dtype): the inverse norms are
    recomputed scaled by the largest element, so the loss equals that of the unscaled
    inputs against the float64 reference, and the gradients scale by the inverse factor
    (before the fix the inverse norm was 0 and every cosine of such a row 0)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 24, generator=g).to(dtype)
    w = torch.randn(40, 24, generator=g).to(dtype)
    y = torch.randint(0, 40, (13,), generator=g)
    y[2] = 7
    big_x, big_w = 2.0 ** 100, 2.0 ** 70
    xs, ws = x.clone(), w.clone()
    xs[[0, 2]] *= big_x
    ws[7] *= big_w
    xs.requires_grad_()
    ws.requires_grad_()
    loss = ak.arcface_loss(xs, ws, y, backend="cpp", reduction="none")
    want = ak.arcface_loss(x.double().requires_grad_(), w.double(), y, backend="reference",
                           reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    xr = x.double().requires_grad_()
    wr = w.double().requires_grad_()
    ak.arcface_loss(xr, wr, y, backend="reference", reduction="none").sum().backward()
    dx, dw = xs.grad.double(), ws.grad.double()
    dx[[0, 2]] *= big_x
    dw[7] *= big_w
    # the gradients come back rounded to the input dtype
    tol = dict(rtol=1e-2, atol=1e-3) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dx, xr.grad, **tol)
    torch.testing.assert_close(dw, wr.grad, **tol)
