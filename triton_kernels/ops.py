"""The triton backend: ops ``arcface_kernels::triton_fwd`` / ``triton_bwd``.

Registered with ``torch.library.triton_op`` + ``wrap_triton`` (so torch.compile traces
through them with fullgraph=True), with exactly the schemas of ``arcface_kernels._ops``
and the shared autograd formula. The fake kernels come from triton_op's own tracing of
the launchers below (``register_autograd_and_fake(..., with_fake=False)``).

Forward
-------
1. ``inv_norm_kernel``: a_i = 1/|x_i| and b = 1/|w_r| for the shard's rows (read through
   the Partial-FC index; O(N + C K) floats, no normalized copy of W).
2. ``fwd_kernel`` on a grid (row blocks, class splits): each program streams its split's
   classes in [BLOCK_N, BLOCK_C] tiles, computes x . w^T over D in BLOCK_D steps (fp32
   accumulation), scales by a_i b_j in the epilogue, takes the max over the K
   sub-centers, applies the margin to the target column (psi evaluated once per row) and
   folds the tile into an online log-sum-exp, a sum of logits, the target logit and the
   top-1 class. The class dimension is split so that the grid has at least two waves
   of programs even for N = 1024 (8 row blocks x 33 splits on 132 SMs), choosing the
   split count whose last wave is fullest (``_class_splits``); the row-block
   programs of one split run together and share each W tile through L2, so W is read
   from HBM about once. 2 N C D K FLOPs.
3. ``fwd_combine_kernel`` merges the [N, splits] partials (a few KiB).

Backward: the design, at C = 1M (2^20) classes, D = 512, N = 8192, bf16
-----------------------------------------------------------------------------------
Each N x C x D product (logits x W^T, dX = G W, dW = G^T X) is 2NCD = 8.8e15 FLOP, 11 ms
at H100/H200's ~790 TFLOP/s; the N x C gradient itself (8.6e9 values, 17 GB in bf16) must
never exist at once.

(a) Fully fused with atomics (one kernel per [BN, BC] tile recomputes the logits, then
    adds G W_tile into dX and G^T X_tile into dW with fp32 atomics; Cut Cross-Entropy's
    backward is built this way): 6NCD FLOPs, the minimum, but each tile adds (BN + BC) D
    fp32 values atomically, N C D (1/BN + 1/BC) in all: 6.9e10 atomic adds (275 GB of
    read-modify-write through L2) at BN = BC = 128, i.e. > 60 ms at 4.3 TB/s against
    33 ms of math, and the 8192 class-tile programs of one row block all contend for
    the same [BN, 512] dX tile.
(b) Separate dX and dW passes, each recomputing the logits, no atomics: 10NCD FLOPs
    (at best 80% of the 8NCD the benchmark counts), and each program must hold a
    [BN, 512] fp32 gradient accumulator: 256 KiB at BN = 128, the whole register file
    of an SM, which forces BN <= 64 and halves the tile's arithmetic intensity.
(c) Chosen: a bounded workspace of gradient tiles fed to GEMMs. For a chunk of Cb
    classes, ``bwd_grad_kernel`` recomputes the logits tile by tile exactly as the
    forward does (same loads, same fp32 accumulation order, so p_ij matches the forward's
    lse) and writes G_ij = dL/dc_ij in the input dtype into a [N, Cb K] workspace; then
    two cuBLAS GEMMs: V += G @ W_hat_chunk and U_chunk = G^T @ X_hat, where X_hat = a x
    (N x D, once) and W_hat_chunk = the chunk's rows scaled by b (Cb K x D, bounded; W
    is never copied whole). With r_i = sum_j G_ij c_ij and q_j = sum_i G_ij c_ij
    (partial sums written by the kernel, reduced with torch.sum: deterministic, no
    atomics):
        dx_i = a_i V_i - r_i a_i^2 x_i              dw_j = b_j U_j - q_j b_j^2 w_j
    Every GEMM operand is O(1) (X_hat, W_hat) or O(s) (G), so fp16 neither overflows nor
    underflows whatever the norms of x and w.
    FLOPs: 6NCD (8NCD with the forward: exactly what the benchmark counts). Bytes: G is
    written once and read by the two GEMMs, 3 x 2 B per logit; every one of these
    passes does 2D = 1024 FLOPs per 2-byte G element, far above H100's ~184 FLOP/B ridge,
    so they stay compute-bound. No contention. Cost: one extra read of W for W_hat and
    of x for X_hat.
    Memory (default 16 MiB workspace, ARCFACE_TRITON_WORKSPACE_MB): at N = 8192, bf16,
    Cb = 1024: G 16 MiB + fp32 dX accumulator 16 MiB + X_hat 8 MiB + chunk GEMM outputs
    8 + 1 MiB + W_hat 1 MiB + fp32 temporaries of the dW projection ~4 MiB ~ 54 MiB
    beyond inputs, gradients and O(N + C). Each chunk's GEMMs still have N Cb D =
    4.3e9 MACs; their outputs are small (N x 512 and Cb x 512) with a long K, the
    shape cuBLAS serves with split-K. At N = 1024 (model parallel), Cb = 8192.

Precision and options
---------------------
* fp16 / bf16 inputs: tensor-core dots with fp32 accumulation, fp32 statistics, G in
  the input dtype; gradients in the input dtype.
  fp32 inputs: tl.dot with input_precision "ieee" by default (TF32 would cost ~1e-3 of
  a cosine, 0.06 of a logit at s = 64); ARCFACE_TRITON_FP32_PRECISION=tf32x3|tf32
  trades accuracy for speed. float64: broadcast products in float64 (tests/gradcheck).
* ``DW_FP32`` (env ARCFACE_TRITON_DW_FP32=1): dW is held in float32 (C K D x 4 bytes
  extra: 2 GiB at C = 1M, D = 512) and each chunk's dW GEMM produces fp32, so repeated
  Partial-FC classes accumulate in fp32 and dW is rounded once at the end. Default: the
  chunk GEMM rounds to the input dtype once, the projection runs in fp32, and the
  result is rounded once more when stored.
* Fixed launch configs per dtype (``triton_kernels.configs``); ARCFACE_TRITON_AUTOTUNE=1
  autotunes the forward and backward tile kernels instead.
* Under TRITON_INTERPRET=1 (CPU tests) small tiles are used, and bf16 operands are
  upcast before tl.dot (the interpreter's bf16 dot is wrong, design.md section 6).

Performance figures: none measured yet (no GPU run exists).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from arcface_kernels._config import MarginConfig
from arcface_kernels._ops import NAMESPACE, acc_dtype, register_autograd_and_fake

from . import configs as cfgs
from . import kernels as K

FWD_NAME = f"{NAMESPACE}::triton_fwd"
BWD_NAME = f"{NAMESPACE}::triton_bwd"

#: Hold dW in float32 and run the dW GEMMs with fp32 output (see the module docstring).
DW_FP32 = os.environ.get("ARCFACE_TRITON_DW_FP32", "0") not in ("", "0")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _check_args(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor],
                sub_centers: int) -> None:
    """Shape / dtype / device checks of a direct op call (arcface_loss checks first)."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"triton backend: x and w must be 2-D, got shapes {tuple(x.shape)} "
                         f"and {tuple(w.shape)}")
    if x.dtype not in _FLOATS or w.dtype != x.dtype:
        raise TypeError(f"triton backend: x and w must share a floating dtype "
                        f"(float16/bfloat16/float32/float64), got {x.dtype} and {w.dtype}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"triton backend: x has D={x.shape[1]} but w has D={w.shape[1]}")
    if labels.dtype != torch.int64:
        raise TypeError(f"triton backend: labels must be int64, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"triton backend: labels must have shape [{x.shape[0]}], "
                         f"got {tuple(labels.shape)}")
    if isinstance(sub_centers, bool) or sub_centers < 1 or w.shape[0] % sub_centers:
        raise ValueError(f"triton backend: sub_centers must be >= 1 and divide w's "
                         f"{w.shape[0]} rows, got {sub_centers}")
    devs = {x.device, w.device, labels.device}
    if index is not None:
        if index.dtype != torch.int64:
            raise TypeError(f"triton backend: index must be int64, got {index.dtype}")
        if index.dim() != 1:
            raise ValueError(f"triton backend: index must be 1-D, got shape "
                             f"{tuple(index.shape)}")
        devs.add(index.device)
        num_w = w.shape[0] // sub_centers
        if index.numel() and index.is_cuda:
            # no host sync: a device-side assert (the kernels never read outside w anyway)
            torch._assert_async(((index >= 0) & (index < num_w)).all(),
                                f"triton backend: index values must be in [0, {num_w}) "
                                "(classes of w)")
        elif index.numel() and not _traced(index):
            lo, hi = torch.stack(torch.aminmax(index)).tolist()
            if lo < 0 or hi >= num_w:
                raise ValueError(f"triton backend: index values must be in [0, {num_w}) "
                                 f"(classes of w), got min {lo}, max {hi}")
    if len(devs) != 1:
        raise ValueError(f"triton backend: all tensors must be on one device, got {devs}")


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
    device and its current stream, not on the tensors' device (a tensor on cuda:1 while
    cuda:0 is current fails with "Pointer argument cannot be accessed from Triton" or
    worse). Not needed while tracing (the compiled graph sets its own device guard)."""
    if t.device.type == "cuda" and not _traced(t):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_PARAMS_CACHE: dict = {}


def _prepared(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor], k: int):
    """(x, w with unit row stride, labels and index contiguous, classes in the shard)."""
    index = None if index is None else index.contiguous()
    num_classes = index.shape[0] if index is not None else w.shape[0] // k
    return _rows(x), _rows(w), labels.contiguous(), index, num_classes


def _rows(t: Tensor) -> Tensor:
    """t itself when its rows are contiguous (any row stride: a slice of a bigger weight
    is read in place), else a contiguous copy."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _params(x: Tensor, s: float, m1: float, m2: float, m3: float) -> Tensor:
    """[s, m1, m2, m3] as a float64 tensor: the kernels cast them to their compute
    dtype (a Python float argument would reach a kernel as float32). Cached per device
    and values in eager mode, so a training step does not copy them to the GPU again."""
    if _traced(x):
        return torch.tensor([s, m1, m2, m3], dtype=torch.float64, device=x.device)
    key = (x.device, s, m1, m2, m3)
    t = _PARAMS_CACHE.get(key)
    if t is None:
        if len(_PARAMS_CACHE) >= 64:
            _PARAMS_CACHE.clear()
        t = _PARAMS_CACHE[key] = torch.tensor([s, m1, m2, m3], dtype=torch.float64,
                                              device=x.device)
    return t


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
    cfg = cfgs.norm_config(src.dtype, _interpreted())
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]),)
    idx = index if index is not None else src   # never read: a read-only placeholder
    _launch(K.inv_norm_kernel, grid,
        src, idx, out, rows, src.shape[1], src.stride(0), src.shape[0] // k,
        K=k, HAS_INDEX=index is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"])
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
    if cfgs.AUTOTUNE and not _interpreted() and dtype in (torch.float16, torch.bfloat16):
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


def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return cfgs.WAVES * torch.cuda.get_device_properties(device).multi_processor_count
    return cfgs.INTERPRET_PROGRAMS


@triton_op(FWD_NAME, mutates_args=())
def triton_fwd(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor], s: float,
               m1: float, m2: float, m3: float, wrap_mode: int, grad_mode: int,
               normalize: bool, sub_centers: int, block: int
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward primitive (see ``arcface_kernels._ops``).

    x [N, D], w [C_w * K, D] (same float dtype), labels [N] int64 (shard position or -1),
    index [C] int64 or None. Returns lse, target, sum_z, max_z [N] (float32; float64 for
    float64 inputs) and argmax [N] int64. ``block`` is ignored by the forward."""
    MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers)
    _check_args(x, w, labels, index, sub_centers)
    k = sub_centers
    x, w, labels, index, num_classes = _prepared(x, w, labels, index, k)
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
    prm = _params(x, s, m1, m2, m3)
    cfg = cfgs.tile_config(x.dtype, _interpreted(), k)
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    class_blocks = triton.cdiv(num_classes, cfg["BLOCK_C"])
    splits, per_split = _class_splits(row_blocks, class_blocks, cfg["BLOCK_C"],
                                      _num_programs_target(dev))
    part = [torch.empty(n, splits, dtype=acc, device=dev) for _ in range(5)]
    parg = torch.empty(n, splits, dtype=torch.int64, device=dev)
    pmax, psum, psz, pbest, ptgt = part
    idx = index if index is not None else labels
    meta = dict(K=k, HAS_INDEX=index is not None, NORMALIZE=normalize, WRAP=wrap_mode,
                M1_IS_ONE=(m1 == 1.0), DOT_MODE=_dot_mode(x.dtype),
                FP32_PREC=cfgs.FP32_PREC)
    kernel, meta = _tile_kernel(K.fwd_kernel, "fwd", x.dtype, cfg, meta)
    _launch(kernel, (row_blocks, splits),
        x, w, labels, idx, a, b, prm, pmax, psum, psz, pbest, parg, ptgt,
        n, num_classes, w.shape[0] // k, d, x.stride(0), w.stride(0), per_split, **meta)
    blk = cfgs.COMBINE_BLOCK
    _launch(K.fwd_combine_kernel, (triton.cdiv(n, blk),),
        pmax, psum, psz, pbest, parg, ptgt, prm, lse, tgt, sum_z, max_z, arg, n, splits,
        BLOCK=blk)
    return lse, tgt, sum_z, max_z, arg


def _chunk_classes(n: int, k: int, elt: int, num_classes: int, block: int, align: int) -> int:
    """Classes per backward chunk: the ``block`` hint, else as many as fit the workspace;
    at most MAX_GRID_YZ class tiles of ``align`` classes (the backward grid's axis 1: a
    small N, e.g. N = 1 in fp16 with 16 MiB, would otherwise ask for 65536 of them)."""
    if block > 0:
        cb = block
    else:
        cb = cfgs.WORKSPACE_BYTES // max(1, n * k * elt)
        cb = max(align, cb // align * align)
    cb = min(cb, cfgs.MAX_GRID_YZ * align)
    return max(1, min(cb, num_classes))


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with a float32 result (fp32 accumulation inside the GEMM)."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b)
    if a.device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


@triton_op(BWD_NAME, mutates_args=())
def triton_bwd(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor], lse: Tensor,
               g_p: Tensor, g_t: Tensor, g_s: Tensor, s: float, m1: float, m2: float,
               m3: float, wrap_mode: int, grad_mode: int, normalize: bool,
               sub_centers: int, block: int) -> Tuple[Tensor, Tensor]:
    """Backward primitive (see ``arcface_kernels._ops``): dL/dz_ij = g_p_i exp(z_ij -
    lse_i) + g_t_i [j = label_i] + g_s_i. lse, g_p, g_t, g_s [N]. Returns dx [N, D] and
    dw [C_w * K, D] in the input dtype (zero outside the shard's rows). ``block``: classes
    per backward chunk (0: as many as the workspace holds)."""
    MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers)
    _check_args(x, w, labels, index, sub_centers)
    for name, t in (("lse", lse), ("g_p", g_p), ("g_t", g_t), ("g_s", g_s)):
        if t.shape != (x.shape[0],):
            raise ValueError(f"triton backend: {name} must have shape [{x.shape[0]}], "
                             f"got {tuple(t.shape)}")
    k = sub_centers
    x, w, labels, index, num_classes = _prepared(x, w, labels, index, k)
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    dev = x.device
    lse, g_p, g_t, g_s = (t.to(acc).contiguous() for t in (lse, g_p, g_t, g_s))
    dw_dtype = acc if (DW_FP32 or x.dtype in (torch.float32, torch.float64)) else w.dtype
    # without an index the chunks below write every row of dw: no zero fill needed
    full = index is None and n > 0 and num_classes > 0
    dw = (torch.empty if full else torch.zeros)(w.shape, dtype=dw_dtype, device=dev)
    dxs = torch.zeros(n, d, dtype=acc, device=dev)
    if n == 0 or num_classes == 0:
        return dxs.to(x.dtype), dw.to(w.dtype)
    a, b = _norms(x, w, index, k, normalize, num_classes, acc)
    prm = _params(x, s, m1, m2, m3)
    cfg = cfgs.tile_config(x.dtype, _interpreted(), k)
    bn, bc = cfg["BLOCK_N"], cfg["BLOCK_C"]
    cb_max = _chunk_classes(n, k, x.element_size(), num_classes, block, bc)
    ws = torch.empty(n * cb_max * k, dtype=x.dtype, device=dev)
    r = torch.zeros(n, dtype=acc, device=dev)
    idx = index if index is not None else labels
    meta = dict(K=k, HAS_INDEX=index is not None, NORMALIZE=normalize, WRAP=wrap_mode,
                GRAD=grad_mode, M1_IS_ONE=(m1 == 1.0), DOT_MODE=_dot_mode(x.dtype),
                FP32_PREC=cfgs.FP32_PREC)
    kernel, meta = _tile_kernel(K.bwd_grad_kernel, "bwd", x.dtype, cfg, meta)
    # x_hat = a x (N x D in the input dtype): every GEMM operand is then O(1) or O(s)
    x_hat = (x.to(acc) * a.unsqueeze(1)).to(x.dtype) if normalize else x
    for j0 in range(0, num_classes, cb_max):
        cb = min(cb_max, num_classes - j0)
        h = ws[: n * cb * k].view(n, cb * k)
        r_part = torch.empty(triton.cdiv(cb, bc), n, dtype=acc, device=dev)
        q_part = torch.empty(triton.cdiv(n, bn), cb * k, dtype=acc, device=dev)
        _launch(kernel, (triton.cdiv(n, bn), triton.cdiv(cb, bc)),
            x, w, labels, idx, a, b, prm, lse, g_p, g_t, g_s, h, h.stride(0), r_part, q_part,
            n, j0, cb, w.shape[0] // k, d, x.stride(0), w.stride(0), **meta)
        # the chunk's rows of w (a view when contiguous, gathered through the index)
        if index is None:
            rows = None
            w_rows = w[j0 * k:(j0 + cb) * k]
        else:
            rows = (index[j0:j0 + cb].unsqueeze(1) * k
                    + torch.arange(k, device=dev)).reshape(-1)
            w_rows = w.index_select(0, rows)
        if normalize:
            b_c = b[j0 * k:(j0 + cb) * k]
            w_hat = (w_rows.to(acc) * b_c.unsqueeze(1)).to(x.dtype)
        else:
            w_hat = w_rows
        if x.dtype in (torch.float32, torch.float64):
            dxs.addmm_(h, w_hat)
        else:
            dxs.add_(torch.mm(h, w_hat))
        u = _mm_fp32(h.t(), x_hat) if DW_FP32 else torch.mm(h.t(), x_hat)
        if normalize:
            r += r_part.sum(0)
            q = q_part.sum(0)
            dwc = u.to(acc) * b_c.unsqueeze(1) - (q * b_c * b_c).unsqueeze(1) * w_rows.to(acc)
        else:
            dwc = u
        if rows is None:
            dw[j0 * k:(j0 + cb) * k] = dwc.to(dw_dtype)
        else:
            dw.index_add_(0, rows, dwc.to(dw_dtype))
    if normalize:
        dxs.mul_(a.unsqueeze(1)).sub_((r * a * a).unsqueeze(1) * x.to(acc))
    return dxs.to(x.dtype), dw.to(w.dtype)


FWD_OP = torch.ops.arcface_kernels.triton_fwd.default
BWD_OP = torch.ops.arcface_kernels.triton_bwd.default
register_autograd_and_fake(FWD_NAME, BWD_NAME, FWD_OP, BWD_OP, with_fake=False)
