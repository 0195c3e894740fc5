"""Launchers of the triton backend: plain tensors and numbers in, tensors out. This
package imports torch and triton only; ``arcface_kernels._triton`` registers these as the
ops ``arcface_kernels::triton_fwd`` / ``triton_bwd`` (torch.library.triton_op: every
kernel is launched through ``wrap_triton``, so torch.compile traces through them).

Forward (5 launches)
--------------------
1. ``inv_norm_kernel`` x2: a_i = 1/|x_i| and b = 1/|w_r| for the shard's rows (read
   through the Partial-FC index; no normalized copy of W).
2. ``target_kernel``: per row, the target's cosine, margin logit s psi(c_t) and
   sub-center, from one row dot product: the tile kernels never evaluate the margin.
3. ``fwd_kernel`` on a grid (row blocks, class splits): each program streams its split's
   classes in [BLOCK_N, BLOCK_C] tiles, computes x . w^T over D (fp32 accumulation) and
   folds the tile into an online log-sum-exp over the non-target classes, in base 2, with
   one running max that is also the top-1. The class dimension is split so that the grid
   has at least two waves of programs even for N = 1024 (``_class_splits``); the
   row-block programs of one split run together and share each W tile through L2.
4. ``fwd_combine_kernel`` merges the [N, splits] partials and the target's margin logit.

Backward: the design (N = 8192, C = 262144, D = 512, bf16, an H200)
-----------------------------------------------------------------
With G = dL/dc, a = 1/|x|, b = 1/|w|, the normalization backward is

    dx_i = a_i (sum_j G_ij b_j w_j - r_i a_i x_i)     r_i = sum_j G_ij c_ij
    dw_j = b_j (sum_i G_ij a_i x_i - q_j b_j w_j)     q_j = sum_i G_ij c_ij

The kernel writes H = a_i b_j G_ij, so both products read the raw inputs:

    V = H @ W  ->  dx_i = V_i - <x_i, V_i> a_i^2 x_i      (<x_i, V_i> = r_i)
    U = H^T X  ->  dw_j = U_j - <w_j, U_j> b_j^2 w_j      (<w_j, U_j> = q_j)

r and q come from the products' outputs, not from reductions in the tile kernel; no
normalized copy of x or w is made. For a chunk of Cb classes (H [N, Cb K] in a bounded
workspace, default 16 MiB: Cb = 1024 at N = 8192, 8192 at N = 1024), three launches:

1. ``grad_kernel`` recomputes the logits tile by tile exactly as the forward does (same
   tiles, same accumulation order, so p_ij matches the forward's lse) and stores H in
   full tiles (16-byte stores);
2. ``bwd_mm_kernel`` runs both products in one launch: V partials += H @ W_chunk (fp32,
   accumulated in place across chunks: no rounding of a chunk's dX) and U partials = H^T
   X; each is split over K (into partial buffers, summed later: deterministic, no
   atomics) where its output tiles alone would not fill about two programs per SM;
3. ``proj_rows_kernel`` sums the chunk's U partials and writes its dW rows (through
   index_add_ when an index may repeat a class).

At the end one ``proj_rows_kernel`` turns the V partials into dx. FLOPs: 6 N C D (8 N C D
with the forward: what the benchmark counts). Why not the alternatives: fully fused with
atomic adds into dX and dW (Cut Cross-Entropy's backward) moves N C D (1/BN + 1/BC)
fp32 values through L2 atomics, about 70 GB at C = 1M, slower than the math; separate dX
and dW passes recompute the logits twice (10 N C D). Memory at N = 8192: H 16 MiB + V
16 MiB + U partials + vectors, under 64 MiB; at N = 1024, C = 1M: H 16 MiB + U 16 MiB +
b 4 MiB + V partials. Host work: 3 launches per chunk (about 30 us), under the chunk's
GPU time (about 35 us at N = 8192).

What the static report predicts (``bench/results/static_sm90a.md``, 2026-12-02, an H200
model, bf16): at N = 8192, C = 262144 a step of 16.3 ms (0.68 of the 790 TFLOP/s matmul
rate): fwd_kernel 2.9 ms, grad_kernel 4.1 ms, bwd_mm_kernel 7.8 ms, the dW projections
1.2 ms; 43 MiB beyond inputs and gradients; host work 7.2 ms, under the GPU's. The
previous design (cuBLAS products on X_hat / W_hat copies, about 23 torch ops per chunk)
was predicted at 36 ms. bwd_mm_kernel is issue-bound (about 200 instructions per 64 x
128 x 64 step, mostly cp.async address arithmetic): TMA loads are the next step.

Bias, soft cap, interclass filter
---------------------------------
v = s u + bias[class], z = softcap tanh(v / softcap), u = 0 for a filtered non-target
(docs/design.md section 3), switched by constexprs (``_terms``): with all three off the
kernels' machine code is that of the plain loss. The forward's top-1 runs over s c +
bias; with the cap or the filter the exponential sum keeps its own running max (a
filtered logit may sit far below the top-1). The backward's grad_kernel also writes the
column sums of dL/dv per row block ([N / BLOCK_N, chunk] partials), which
``bias_sum_kernel`` adds in order; an index maps them to classes with index_put_
(accumulate, deterministic).

Precision
---------
fp16 / bf16 inputs: tensor-core dots with fp32 accumulation, fp32 statistics, H in the
input dtype, dX and dW products accumulated in fp32, gradients rounded once. float16's
range (6e-8 .. 65504) cannot hold a_i b_j dL/dc for arbitrary norms of x and w, so for
float16 H = dL/dc (O(s); use loss scaling, as always for fp16) and the products scale
each row of w and x by b or a as they load it (unit rows); the projection then applies
the outer a or b. bf16 and fp32 keep H = a b dL/dc. fp32: ``tl.dot`` with input_precision "ieee" by default (TF32
would cost about 1e-3 of a cosine: 0.06 of a logit at s = 64); the ``fp32_precision``
option trades accuracy for speed. float64: broadcast products (tests, gradcheck).
Determinism: every output tile has one writer and the chunks run in order, so the
gradients are bitwise reproducible, except dw through a Partial-FC index that repeats a
class (index_add_ uses atomics; PartialFC's sampling never repeats). The gradient filter
(``grad_filter`` > 0) skips zero tiles with a branch in the products' loop, which is then
not software-pipelined: it pays off only where most tiles are dropped.

Options: ``options.OPTIONS`` (read once from the environment); under TRITON_INTERPRET=1
(CPU tests) small tiles are used and bf16 operands are upcast before tl.dot (the
interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from . import configs as cfgs
from . import kernels as K
from .options import OPTIONS


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _traced(*tensors) -> bool:
    """True when the tensors are stand-ins of a trace (fake or functional tensors of
    torch.compile / AOTAutograd / triton_op's fake derivation), or under Dynamo: no data
    can be read then, and no interpreted kernel can run."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)


def _launch(kernel, grid, *args, **meta) -> None:
    """wrap_triton(kernel)[grid](*args, **meta). Under TRITON_INTERPRET=1, wrap_triton
    hands back the bare interpreted kernel, which cannot run on fake tensors: when
    triton_op derives the fake kernel by tracing a launcher, the launch is skipped there
    (the outputs' shapes and dtypes are already fixed by their allocation)."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if _interpreted():
        from torch._subclasses.fake_tensor import FakeTensor
        if _traced(*tensors):
            if all(type(t) is FakeTensor for t in tensors):
                return
            raise NotImplementedError(
                "torch.compile / AOT tracing of the triton backend needs a GPU: under "
                "TRITON_INTERPRET=1 the kernels cannot be traced")
    with _device_guard(tensors[0]):
        wrap_triton(kernel)[grid](*args, **meta)


def _device_guard(t: Tensor):
    """Make t's GPU the current device while launching: Triton launches on the current
    device and its current stream, not on the tensors' device. Not needed while tracing
    (the compiled graph sets its own device guard)."""
    if t.device.type == "cuda" and not _traced(t):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_PARAMS_CACHE: dict = {}


def _rows(t: Tensor) -> Tensor:
    """t itself when its rows are contiguous (any row stride: a slice of a bigger weight
    is read in place), else a contiguous copy."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _prepared(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor], k: int):
    """(x, w with unit row stride, labels and index contiguous, classes in the shard)."""
    index = None if index is None else index.contiguous()
    num_classes = index.shape[0] if index is not None else w.shape[0] // k
    return _rows(x), _rows(w), labels.contiguous(), index, num_classes


def _params(x: Tensor, s: float, m1: float, m2: float, m3: float, softcap: float = 0.0,
            interclass: float = 0.0) -> Tensor:
    """[s, m1, m2, m3, softcap, interclass] as a float64 tensor: the kernels cast them
    to their compute dtype (a Python float argument would reach a kernel as float32).
    Cached per device and values in eager mode, so a training step does not copy them
    to the GPU again."""
    vals = [s, m1, m2, m3, softcap, interclass]
    if _traced(x):
        return torch.tensor(vals, dtype=torch.float64, device=x.device)
    key = (x.device, *vals)
    t = _PARAMS_CACHE.get(key)
    if t is None:
        if len(_PARAMS_CACHE) >= 64:
            _PARAMS_CACHE.clear()
        t = _PARAMS_CACHE[key] = torch.tensor(vals, dtype=torch.float64, device=x.device)
    return t


def _terms(normalize: bool, bias: Optional[Tensor], softcap: float, interclass: float
           ) -> dict:
    """The kernels' switches of the new logit terms (docs/design.md section 3): HAS_BIAS,
    SOFTCAP (softcap > 0) and INTERCLASS (interclass > 0; with normalization a threshold
    >= 1 drops nothing, clamped cosines being at most 1, so it is off). All False: the
    kernels compile to exactly the work they did before these terms existed."""
    return dict(HAS_BIAS=bias is not None, SOFTCAP=softcap > 0,
                INTERCLASS=interclass > 0 and not (normalize and interclass >= 1.0))


def _dot_mode(dtype: torch.dtype) -> int:
    if dtype == torch.float64:
        return K.DOT_FP64
    if dtype == torch.float32:
        return K.DOT_FP32
    if dtype == torch.bfloat16 and _interpreted():
        return K.DOT_UPCAST
    return K.DOT_TENSOR_CORE


def _inv_norms(src: Tensor, index: Optional[Tensor], k: int, rows: int,
               acc: torch.dtype) -> Tensor:
    """Inverse row norms [rows] of src (through the index: the shard's rows of w)."""
    out = torch.empty(rows, dtype=acc, device=src.device)
    if rows == 0:
        return out
    cfg = cfgs.rows_config(_interpreted(), src.shape[1])
    idx = index if index is not None else src   # never read: a read-only placeholder
    _launch(K.inv_norm_kernel, (triton.cdiv(rows, cfg["BLOCK_M"]),),
            src, idx, out, rows, src.shape[1], src.stride(0), src.shape[0] // k,
            K=k, HAS_INDEX=index is not None, BLOCK_M=cfg["BLOCK_M"],
            BLOCK_D=min(cfg["BLOCK_D"], 128), num_warps=cfg["num_warps"])
    return out


def _norms(x: Tensor, w: Tensor, index: Optional[Tensor], k: int, normalize: bool,
           num_classes: int, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    if not normalize:  # unused by the kernels: one-element placeholders of the acc dtype
        dummy = torch.zeros(1, dtype=acc, device=x.device)
        return dummy, dummy
    return (_inv_norms(x, None, 1, x.shape[0], acc),
            _inv_norms(w, index, k, num_classes * k, acc))


def _tile_kernel(kernel, name: str, dtype: torch.dtype, cfg: dict, meta: dict):
    """(kernel, launch keywords): the fixed config, or the autotuned variant."""
    if OPTIONS.autotune and not _interpreted() and dtype in (torch.float16, torch.bfloat16):
        return cfgs.autotuned(kernel, name, dtype, cfg), meta
    return kernel, dict(meta, **cfg)


def _class_splits(row_blocks: int, class_blocks: int, block_c: int, slots: int
                  ) -> Tuple[int, int]:
    """(splits, classes per split) of the forward grid (row_blocks x splits programs).

    At least ``slots`` programs (about two per SM) when there are enough class blocks;
    among up to twice that many splits, the count whose last wave is fullest (programs
    of one split do equal work), fewest splits on ties."""
    lo = max(1, min(class_blocks, triton.cdiv(slots, row_blocks)))
    hi = max(lo, min(class_blocks, 2 * lo))
    sms = max(1, slots // cfgs.WAVES)

    def fill(sp):
        per = triton.cdiv(class_blocks, sp)
        progs = row_blocks * triton.cdiv(class_blocks, per)
        return progs / (triton.cdiv(progs, sms) * sms)

    best = max(range(lo, hi + 1), key=lambda sp: (round(fill(sp), 3), -sp))
    best = min(best, cfgs.MAX_GRID_YZ)   # grid axis 1 (never near it: best <= 2 * slots)
    per_split = triton.cdiv(class_blocks, best)
    return triton.cdiv(class_blocks, per_split), per_split * block_c


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return cfgs.INTERPRET_PROGRAMS // cfgs.WAVES


def _target(x, w, labels, index, a, b, prm, k, normalize, wrap_mode, grad_mode, m1,
            num_w, num_classes, bwd=None, scale_h=True, bias=None, softcap=False
            ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(tz [N], tc [N], tk [N] int32, th [N] or None, tv [N] or None) of target_kernel
    (tv: dL/dv at the target, in the backward with a bias)."""
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    tz = torch.empty(n, dtype=acc, device=x.device)
    tc = torch.empty(n, dtype=acc, device=x.device)
    tk = torch.empty(n, dtype=torch.int32, device=x.device)
    th = torch.empty(n, dtype=acc, device=x.device) if bwd is not None else tz
    with_tv = bwd is not None and bias is not None
    tv = torch.empty(n, dtype=acc, device=x.device) if with_tv else tz
    lse, g_p, g_t, g_s = bwd if bwd is not None else (tz, tz, tz, tz)
    cfg = cfgs.rows_config(_interpreted(), d)
    idx = index if index is not None else labels
    _launch(K.target_kernel, (triton.cdiv(n, cfg["BLOCK_M"]),),
            x, w, labels, idx, a, b, prm, bias if bias is not None else a, tz, tc, tk, lse,
            g_p, g_t, g_s, th, tv, n, num_classes, num_w, d, x.stride(0), w.stride(0),
            K=k, HAS_INDEX=index is not None, NORMALIZE=normalize, WRAP=wrap_mode,
            GRAD=grad_mode, M1_IS_ONE=(m1 == 1.0), BWD=bwd is not None, SCALE_H=scale_h,
            HAS_BIAS=bias is not None, SOFTCAP=softcap,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_D=min(cfg["BLOCK_D"], 128),
            num_warps=cfg["num_warps"])
    return tz, tc, tk, (th if bwd is not None else None), (tv if with_tv else None)


def forward(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor],
            bias: Optional[Tensor], s: float, m1: float, m2: float, m3: float,
            wrap_mode: int, grad_mode: int, normalize: bool, sub_centers: int,
            softcap: float = 0.0, interclass: float = 0.0
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward primitive. x [N, D], w [C_w * K, D] (same float dtype), labels [N] int64
    (shard position or -1), index [C] int64 or None, bias [C_w] or None (per class of w),
    softcap / interclass (0: off; docs/design.md section 3). Returns lse, target, sum_z,
    max_z [N] (float32; float64 for float64 inputs) and argmax [N] int64. The arguments
    are checked by the caller (the registered op: arcface_kernels._checks.check_op_args)."""
    k = sub_centers
    x, w, labels, index, num_classes = _prepared(x, w, labels, index, k)
    bias = None if bias is None else bias.contiguous()
    terms = _terms(normalize, bias, softcap, interclass)
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    dev = x.device
    lse = torch.empty(n, dtype=acc, device=dev)
    tgt = torch.empty(n, dtype=acc, device=dev)
    sum_z = torch.empty(n, dtype=acc, device=dev)
    max_z = torch.empty(n, dtype=acc, device=dev)
    arg = torch.empty(n, dtype=torch.int64, device=dev)
    if n == 0:
        return lse, tgt, sum_z, max_z, arg
    if num_classes == 0:
        lse.fill_(-math.inf)
        max_z.fill_(-math.inf)
        tgt.zero_()
        sum_z.zero_()
        arg.zero_()
        return lse, tgt, sum_z, max_z, arg
    a, b = _norms(x, w, index, k, normalize, num_classes, acc)
    prm = _params(x, s, m1, m2, m3, softcap, interclass)
    num_w = w.shape[0] // k
    tz, tc, _tk, _, _ = _target(x, w, labels, index, a, b, prm, k, normalize, wrap_mode,
                                grad_mode, m1, num_w, num_classes, bias=bias,
                                softcap=terms["SOFTCAP"])
    cfg = cfgs.tile_config(x.dtype, _interpreted(), k)
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    class_blocks = triton.cdiv(num_classes, cfg["BLOCK_C"])
    splits, per_split = _class_splits(row_blocks, class_blocks, cfg["BLOCK_C"],
                                      cfgs.WAVES * _sms(dev))
    pmax, psum, psz = (torch.empty(n, splits, dtype=acc, device=dev) for _ in range(3))
    parg = torch.empty(n, splits, dtype=torch.int32, device=dev)
    # the exponential sums' own shifts (soft cap / filter: not the top-1's max)
    sep_max = terms["SOFTCAP"] or terms["INTERCLASS"]
    plm = torch.empty(n, splits, dtype=acc, device=dev) if sep_max else pmax
    idx = index if index is not None else labels
    meta = dict(K=k, HAS_INDEX=index is not None, NORMALIZE=normalize,
                DOT_MODE=_dot_mode(x.dtype), FP32_PREC=OPTIONS.fp32_prec, **terms)
    kernel, meta = _tile_kernel(K.fwd_kernel, "fwd", x.dtype, cfg, meta)
    _launch(kernel, (row_blocks, splits),
            x, w, labels, idx, a, b, prm, bias if bias is not None else a, pmax, psum, psz,
            parg, plm, n, num_classes, num_w, d, x.stride(0), w.stride(0), per_split,
            **meta)
    blk = cfgs.COMBINE_BLOCK
    _launch(K.fwd_combine_kernel, (triton.cdiv(n, blk),),
            pmax, psum, psz, parg, plm, tz, tc, labels, prm, lse, tgt, sum_z, max_z, arg,
            n, splits, SEP_MAX=sep_max, SOFTCAP=terms["SOFTCAP"], BLOCK=blk)
    return lse, tgt, sum_z, max_z, arg


def chunk_classes(n: int, k: int, elt: int, num_classes: int, block: int,
                  align: int, d: int = 1, acc_size: int = 4) -> int:
    """Classes per backward chunk: the ``block`` hint, else as many as fit the workspace
    both as H [N, Cb K] (elt bytes) and as one [Cb K, D] fp32 product (whole tiles of
    ``align`` classes); at most MAX_GRID_YZ class tiles (the grad kernel's grid axis 1: a
    small N, e.g. N = 1 in fp16, would ask for more)."""
    if block > 0:
        cb = block
    else:
        cb = OPTIONS.workspace_bytes // max(1, k * max(n * elt, d * acc_size))
        cb = max(align, cb // align * align)
    cb = min(cb, (cfgs.MAX_GRID_YZ - 64) * align)   # padded to whole tiles: a margin
    return max(1, min(cb, num_classes))


def _split(tiles: int, target: int, cap: int) -> int:
    """Parts to split a product's K into: enough for ``target`` programs, at most cap."""
    return max(1, min(cap, triton.cdiv(target, max(tiles, 1))))


def backward(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor],
             bias: Optional[Tensor], lse: Tensor, g_p: Tensor, g_t: Tensor, g_s: Tensor,
             s: float, m1: float, m2: float, m3: float, wrap_mode: int, grad_mode: int,
             normalize: bool, sub_centers: int, softcap: float, interclass: float,
             block: int, grad_filter: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward primitive: dL/dz_ij = g_p_i exp(z_ij - lse_i) + g_t_i [j = label_i] +
    g_s_i. lse, g_p, g_t, g_s [N]. Returns dx [N, D] and dw [C_w * K, D] in the input
    dtype (zero outside the shard's rows) and dbias [C_w] in bias's dtype (zero outside
    the shard; an empty [0] tensor of x's dtype without bias). ``block``: classes per
    backward chunk (0: as many as the workspace holds). ``grad_filter`` eps > 0: a
    gradient tile without a target whose softmax values are all below eps drops its
    p-term, and the products skip it when it is then zero (no smoothing term): Cut
    Cross-Entropy's filter. Arguments checked by the caller, as :func:`forward`'s.

    dbias: per chunk, grad_kernel writes the column sums of dL/dv of each of its tiles
    into a [row blocks, chunk width] partial buffer (about N / BLOCK_N x the chunk's
    classes: a fraction 1 / (BLOCK_N K) of the workspace H), and bias_sum_kernel adds its
    rows in order into the shard's dbias; through an index, index_put_ with accumulate
    (sorted: deterministic) maps shard positions to classes."""
    k = sub_centers
    x, w, labels, index, num_classes = _prepared(x, w, labels, index, k)
    bias = None if bias is None else bias.contiguous()
    terms = _terms(normalize, bias, softcap, interclass)
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    dev = x.device
    lse, g_p, g_t, g_s = (t.to(acc).contiguous() for t in (lse, g_p, g_t, g_s))
    if bias is None:
        db_shard = None
        dbias = torch.empty(0, dtype=x.dtype, device=dev)
    else:
        db_shard = torch.empty(num_classes, dtype=acc, device=dev)
    dw_dtype = acc if (OPTIONS.dw_fp32 or x.dtype in (torch.float32, torch.float64)) \
        else w.dtype
    # without an index the chunks write every row of dw: no zero fill needed
    full = index is None and n > 0 and num_classes > 0
    dw = (torch.empty if full else torch.zeros)(w.shape, dtype=dw_dtype, device=dev)
    dx = torch.empty(n, d, dtype=x.dtype, device=dev)
    if n == 0 or num_classes == 0 or d == 0:
        if bias is not None:
            dbias = torch.zeros_like(bias)
        return dx.zero_(), dw.to(w.dtype), dbias
    a, b = _norms(x, w, index, k, normalize, num_classes, acc)
    prm = _params(x, s, m1, m2, m3, softcap, interclass)
    num_w = w.shape[0] // k
    # float16's range is too narrow for H = a b dL/dc with arbitrary norms: there H =
    # dL/dc (O(s)) and the products scale the rows of w and x they read instead
    scale_h = not (normalize and x.dtype == torch.float16)
    _tz, _tc, tk, th, tv = _target(x, w, labels, index, a, b, prm, k, normalize, wrap_mode,
                                   grad_mode, m1, num_w, num_classes,
                                   bwd=(lse, g_p, g_t, g_s), scale_h=scale_h, bias=bias,
                                   softcap=terms["SOFTCAP"])
    cfg = cfgs.tile_config(x.dtype, _interpreted(), k)
    mcfg = cfgs.mm_config(x.dtype, _interpreted())
    rcfg = cfgs.rows_config(_interpreted(), d)
    bn, bc = cfg["BLOCK_N"], cfg["BLOCK_C"]
    acc_size = torch.finfo(acc).bits // 8
    cb_max = chunk_classes(n, k, x.element_size(), num_classes, block, bc, d, acc_size)
    bm_, bn_ = mcfg["BLOCK_M"], mcfg["BLOCK_N"]
    # the workspace's width: whole grad tiles (full-width stores) and whole GEMM tiles
    # (the products read its zero padding instead of masking columns)
    unit = math.lcm(bc * k, bm_, mcfg["BLOCK_K"])
    ld_h = triton.cdiv(cb_max * k, unit) * unit
    ws = torch.empty(n * ld_h, dtype=x.dtype, device=dev)
    filt = grad_filter > 0
    flag_w = ld_h // (bc * k)
    if filt:   # one int8 per gradient tile; the products' steps must fall inside tiles
        assert bm_ == bn and bn % mcfg["BLOCK_K"] == 0 and (bc * k) % bm_ == 0 \
            and (bc * k) % mcfg["BLOCK_K"] == 0, (cfg, mcfg)
    flags = torch.empty((triton.cdiv(n, bn) * flag_w) if filt else 1, dtype=torch.int8,
                        device=dev)
    tn = triton.cdiv(d, bn_)
    target = cfgs.MM_PROGRAMS * _sms(dev)
    cap = max(1, OPTIONS.workspace_bytes // max(1, n * d * acc_size))
    split_x = _split(triton.cdiv(n, bm_) * tn, target, cap)
    r_max = cb_max * k
    cap_w = max(1, OPTIONS.workspace_bytes // max(1, r_max * d * acc_size))
    split_w = _split(triton.cdiv(r_max, bm_) * tn, target, cap_w)
    vx = torch.empty(split_x, n, d, dtype=acc, device=dev)
    uw = torch.empty(split_w * r_max * d, dtype=acc, device=dev)
    idx = index if index is not None else labels
    if index is not None:
        shard_rows = (index.unsqueeze(1) * k + torch.arange(k, device=dev)).reshape(-1)
        dw_buf = torch.empty(r_max, d, dtype=dw_dtype, device=dev)
    meta = dict(K=k, HAS_INDEX=index is not None, NORMALIZE=normalize,
                DOT_MODE=_dot_mode(x.dtype), FP32_PREC=OPTIONS.fp32_prec, **terms)
    kernel, kmeta = _tile_kernel(K.grad_kernel, "bwd", x.dtype, cfg, meta)
    tiles_x = triton.cdiv(n, bm_) * tn * split_x
    row_blocks = triton.cdiv(n, bn)
    ld_c = flag_w * bc   # the grad grid's class columns: the partials' row length
    if bias is not None:
        dbp = torch.empty(row_blocks * ld_c, dtype=acc, device=dev)
        bias_arg = bias
    else:
        dbp = tv = bias_arg = a   # never read or written: placeholders
    for i, j0 in enumerate(range(0, num_classes, cb_max)):
        cb = min(cb_max, num_classes - j0)
        r = cb * k
        _launch(kernel, (row_blocks, flag_w),
                x, w, labels, idx, a, b, prm, bias_arg, lse, g_p, g_s, th, tk, tv, ws, ld_h,
                flags, dbp, float(grad_filter), n, j0, cb, num_w, d, x.stride(0),
                w.stride(0), FILTER=filt, SCALE_H=scale_h, **kmeta)
        if bias is not None:
            _launch(K.bias_sum_kernel, (triton.cdiv(cb, cfgs.COMBINE_BLOCK),),
                    dbp, ld_c, row_blocks, db_shard, j0, cb, BLOCK=cfgs.COMBINE_BLOCK)
        _launch(K.bwd_mm_kernel, (tiles_x + triton.cdiv(r, bm_) * tn * split_w,),
                ws, ld_h, x, w, idx, a, b, vx, uw, flags, n, j0, cb, num_w, d, x.stride(0),
                w.stride(0), tiles_x, split_x, split_w, int(i == 0), bc * k, bn, flag_w,
                K=k, HAS_INDEX=index is not None, DOT_MODE=_dot_mode(x.dtype),
                FP32_PREC=OPTIONS.fp32_prec, FILTER=filt, SCALE_B=not scale_h, **mcfg)
        out, stride_out = (dw_buf, d) if index is not None else (dw, dw.stride(0))
        _launch(K.proj_rows_kernel, (triton.cdiv(r, rcfg["BLOCK_M"]),),
                uw, split_w, w, w.stride(0), b, idx, out, stride_out, r, j0 * k, num_w, d,
                K=k, HAS_INDEX=index is not None, INDEXED_OUT=index is not None,
                NORMALIZE=normalize, POST_SCALE=not scale_h, BLOCK_R=rcfg["BLOCK_M"],
                BLOCK_D=rcfg["BLOCK_D"],
                ONE_PASS=rcfg["ONE_PASS"], num_warps=rcfg["num_warps"])
        if index is not None:
            dw.index_add_(0, shard_rows[j0 * k:j0 * k + r], dw_buf[:r])
    _launch(K.proj_rows_kernel, (triton.cdiv(n, rcfg["BLOCK_M"]),),
            vx, split_x, x, x.stride(0), a, idx, dx, d, n, 0, num_w, d,
            K=1, HAS_INDEX=False, INDEXED_OUT=False, NORMALIZE=normalize,
            POST_SCALE=not scale_h, BLOCK_R=rcfg["BLOCK_M"], BLOCK_D=rcfg["BLOCK_D"],
            ONE_PASS=rcfg["ONE_PASS"],
            num_warps=rcfg["num_warps"])
    if bias is not None:
        if index is None:
            dbias = db_shard.to(bias.dtype)
        else:   # classes outside the shard get 0; a repeated class accumulates
            dbias = torch.zeros(bias.shape, dtype=acc, device=dev).index_put_(
                (index,), db_shard, accumulate=True).to(bias.dtype)
    return dx, dw.to(w.dtype), dbias
