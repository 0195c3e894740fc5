"""The Triton kernels of the triton backend (launchers and the design are in ops.py).

* :func:`inv_norm_kernel`: inverse L2 norms of rows (of x, or of the shard's rows of w,
  read through the Partial-FC index).
* :func:`fwd_kernel`: for a block of rows and one split of the shard's classes, the
  partial online log-sum-exp, sum of logits, margin target logit and top-1 class.
* :func:`fwd_combine_kernel`: merges the per-split partials into the [N] outputs.
* :func:`bwd_grad_kernel`: recomputes one [BLOCK_N, BLOCK_C] tile of logits and writes
  the tile of G = dL/dc_ij (routed to the arg-max sub-center) into the backward's
  bounded workspace, with the partial sums r_i, q_j of G_ij * c_ij.

Conventions: the last dimension of x and w is contiguous; row offsets are int64 (N*D and
C*K*D may pass 2^31); ``a_ptr``'s element type is the accumulation type (float32, or
float64 for float64 inputs); margins are read from a float64 parameter tensor
[s, m1, m2, m3]. The per-element math comes from ``triton_kernels.math`` only.
"""
import triton
import triton.language as tl

from .math import clamp_unit, inv_norm, lse_finish, lse_merge, lse_update, margin_dpsi, \
    margin_psi

# How a tile's dot products are computed (``DOT_MODE``):
DOT_TENSOR_CORE = 0   # fp16 / bf16 operands, fp32 accumulation
DOT_FP32 = 1          # fp32 operands, precision by FP32_PREC (0 ieee, 1 tf32, 2 tf32x3)
DOT_UPCAST = 2        # bf16 upcast to fp32 first (the interpreter's bf16 dot is wrong)
DOT_FP64 = 3          # float64: broadcast multiply + sum (no fp64 tensor-core path needed)


@triton.jit
def _dot_tile(x_ptr, w_ptr, x_off, w_off, rmask, wmask, D, acc,
              DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """acc [BN, BC] += x[rows] . w[wrows]^T over D; x_off [BN], w_off [BC] int64 offsets
    of the rows' starts; masked rows / columns read zeros."""
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        xt = tl.load(x_ptr + x_off[:, None] + dd[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        wt = tl.load(w_ptr + w_off[None, :] + dd[:, None],
                     mask=wmask[None, :] & dmask[:, None], other=0.0)   # [BD, BC]
        if DOT_MODE == 0:
            acc = tl.dot(xt, wt, acc)
        elif DOT_MODE == 1:
            if FP32_PREC == 0:
                acc = tl.dot(xt, wt, acc, input_precision="ieee")
            elif FP32_PREC == 1:
                acc = tl.dot(xt, wt, acc, input_precision="tf32")
            else:
                acc = tl.dot(xt, wt, acc, input_precision="tf32x3")
        elif DOT_MODE == 2:
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc += tl.sum(xt.to(acc.dtype)[:, :, None] * wt.to(acc.dtype)[None, :, :], axis=1)
    return acc


@triton.jit
def _class_cosines(x_ptr, w_ptr, idx_ptr, b_ptr, a, rows, rmask, cols, cmask,
                   NUM_W_CLASSES, D, stride_x, stride_w,
                   K: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
                   DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Cosines c [BN, BC] of rows x shard classes ``cols`` (max over the K sub-centers;
    plain dot products without NORMALIZE) and the arg-max sub-center kbest [BN, BC].

    ``b_ptr`` holds the inverse norms of the shard's rows (position col*K + k)."""
    if HAS_INDEX:
        cls = tl.load(idx_ptr + cols, mask=cmask, other=0)
        wmask = cmask & (cls >= 0) & (cls < NUM_W_CLASSES)   # never read outside w
    else:
        cls = cols
        wmask = cmask
    x_off = rows * stride_x
    best = tl.zeros((BLOCK_N, BLOCK_C), a.dtype)
    kbest = tl.zeros((BLOCK_N, BLOCK_C), tl.int32)
    for k in tl.static_range(K):
        w_off = (cls * K + k) * stride_w
        dot = _dot_tile(x_ptr, w_ptr, x_off, w_off, rmask, wmask, D,
                        tl.zeros((BLOCK_N, BLOCK_C), a.dtype), DOT_MODE, FP32_PREC, BLOCK_D)
        if NORMALIZE:
            bk = tl.load(b_ptr + cols * K + k, mask=cmask, other=0.0)
            c = clamp_unit(dot * a[:, None] * bk[None, :])
        else:
            c = dot
        if k == 0:
            best = c
        else:
            upd = (c > best) | (c != c)   # a NaN sticks, as in torch.max
            best = tl.where(upd, c, best)
            kbest = tl.where(upd, k, kbest)
    return best, kbest


@triton.jit
def _row_block(pid_n, N, lab_ptr, a_ptr, NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rows of row block ``pid_n`` (int64), their mask, labels (-1 past N) and inverse
    norms a (zeros without normalization)."""
    acc_t: tl.constexpr = a_ptr.dtype.element_ty
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    labels = tl.load(lab_ptr + rows, mask=rmask, other=-1)
    if NORMALIZE:
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    else:
        a = tl.zeros((BLOCK_N,), acc_t)
    return rows, rmask, labels, a


@triton.jit
def _load_params(prm_ptr, dtype: tl.constexpr):
    s = tl.load(prm_ptr + 0).to(dtype)
    m1 = tl.load(prm_ptr + 1).to(dtype)
    m2 = tl.load(prm_ptr + 2).to(dtype)
    m3 = tl.load(prm_ptr + 3).to(dtype)
    return s, m1, m2, m3


@triton.jit
def _target_terms(c, cols, cmask, labels, m1, m2, m3,
                  WRAP: tl.constexpr, GRAD: tl.constexpr, M1_IS_ONE: tl.constexpr,
                  WITH_DPSI: tl.constexpr):
    """(is_t [BN, BC], has_t [BN], psi_t [BN], dpsi_t [BN]): the target column of each row
    in this tile, and the margin (and its derivative) evaluated once per row."""
    is_t = (cols[None, :] == labels[:, None]) & cmask[None, :]
    c_t = tl.sum(tl.where(is_t, c, 0.0), axis=1)
    has_t = tl.sum(is_t.to(tl.int32), axis=1) > 0
    psi_t = margin_psi(c_t, m1, m2, m3, WRAP, M1_IS_ONE)
    if WITH_DPSI:
        dpsi_t = margin_dpsi(c_t, m1, m2, WRAP, GRAD, M1_IS_ONE)
    else:
        dpsi_t = psi_t
    return is_t, has_t, psi_t, dpsi_t


# Shape-like integer arguments that only bound masks and loops are not specialized on
# (Triton otherwise compiles a variant per "== 1" / "% 16 == 0" of each: every new N or
# chunk start of the backward would cost a recompile); D and the row strides are, for
# aligned vector loads.
@triton.jit(do_not_specialize=["M", "NUM_W_CLASSES"])
def inv_norm_kernel(src_ptr, idx_ptr, out_ptr, M, D, stride, NUM_W_CLASSES,
                    K: tl.constexpr, HAS_INDEX: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = 1 / max(|src row|, eps) for r < M. With HAS_INDEX, output row r is row
    index[r // K] * K + r % K of src (the shard's rows of w, in shard order)."""
    pid = tl.program_id(0)
    r = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask = r < M
    if HAS_INDEX:
        cls = tl.load(idx_ptr + r // K, mask=mask, other=0)
        valid = mask & (cls >= 0) & (cls < NUM_W_CLASSES)
        srow = cls * K + r % K
    else:
        valid = mask
        srow = r
    acc_t: tl.constexpr = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M,), acc_t)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(src_ptr + srow[:, None] * stride + dd[None, :],
                    mask=valid[:, None] & (dd < D)[None, :], other=0.0).to(acc_t)
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + r, inv_norm(acc), mask=mask)


@triton.jit(do_not_specialize=["N", "C", "NUM_W_CLASSES", "cls_per_split"])
def fwd_kernel(x_ptr, w_ptr, lab_ptr, idx_ptr, a_ptr, b_ptr, prm_ptr,
               pmax_ptr, psum_ptr, psz_ptr, pbest_ptr, parg_ptr, ptgt_ptr,
               N, C, NUM_W_CLASSES, D, stride_x, stride_w, cls_per_split,
               K: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
               WRAP: tl.constexpr, M1_IS_ONE: tl.constexpr,
               DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (row blocks, class splits). Partials [N, splits] of: running max and sum of
    exp (online lse), sum of logits, best cosine and its class, target logit."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_t: tl.constexpr = a_ptr.dtype.element_ty
    rows, rmask, labels, a = _row_block(pid_n, N, lab_ptr, a_ptr, NORMALIZE, BLOCK_N)
    s, m1, m2, m3 = _load_params(prm_ptr, acc_t)
    run_max = tl.full((BLOCK_N,), float("-inf"), acc_t)
    run_sum = tl.zeros((BLOCK_N,), acc_t)
    sum_z = tl.zeros((BLOCK_N,), acc_t)
    tgt = tl.zeros((BLOCK_N,), acc_t)
    best = tl.full((BLOCK_N,), float("-inf"), acc_t)
    arg = tl.zeros((BLOCK_N,), tl.int64)
    j_start = pid_s.to(tl.int64) * cls_per_split
    j_end = tl.minimum(j_start + cls_per_split, C)
    for j0 in range(j_start, j_end, BLOCK_C):
        cols = j0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < j_end
        c, _kb = _class_cosines(x_ptr, w_ptr, idx_ptr, b_ptr, a, rows, rmask, cols, cmask,
                                NUM_W_CLASSES, D, stride_x, stride_w, K, HAS_INDEX,
                                NORMALIZE, DOT_MODE, FP32_PREC, BLOCK_N, BLOCK_C, BLOCK_D)
        is_t, has_t, psi_t, _d = _target_terms(c, cols, cmask, labels, m1, m2, m3, WRAP, 0,
                                               M1_IS_ONE, False)
        z = s * tl.where(is_t, psi_t[:, None], c)
        z = tl.where(cmask[None, :], z, float("-inf"))
        tgt += tl.where(has_t, s * psi_t, 0.0)
        sum_z += tl.sum(tl.where(cmask[None, :], z, 0.0), axis=1)
        run_max, run_sum = lse_update(run_max, run_sum, z)
        cm = tl.where(cmask[None, :], c, float("-inf"))
        blk_best = tl.max(cm, axis=1)
        blk_arg = tl.argmax(cm, axis=1).to(tl.int64) + j0
        upd = (j0 == j_start) | (blk_best > best) | ((blk_best != blk_best) & (best == best))
        best = tl.where(upd, blk_best, best)
        arg = tl.where(upd, blk_arg, arg)
    off = rows * tl.num_programs(1) + pid_s   # partials are [N, splits], int64 offsets
    tl.store(pmax_ptr + off, run_max, mask=rmask)
    tl.store(psum_ptr + off, run_sum, mask=rmask)
    tl.store(psz_ptr + off, sum_z, mask=rmask)
    tl.store(pbest_ptr + off, best, mask=rmask)
    tl.store(parg_ptr + off, arg, mask=rmask)
    tl.store(ptgt_ptr + off, tgt, mask=rmask)


@triton.jit(do_not_specialize=["N", "SPLITS"])
def fwd_combine_kernel(pmax_ptr, psum_ptr, psz_ptr, pbest_ptr, parg_ptr, ptgt_ptr, prm_ptr,
                       lse_ptr, tgt_ptr, sz_ptr, maxz_ptr, arg_ptr, N, SPLITS,
                       BLOCK: tl.constexpr):
    """Merge the [N, SPLITS] partials of fwd_kernel into the [N] outputs (a class-wise
    tie keeps the lower class, as within a split)."""
    pid = tl.program_id(0)
    acc_t: tl.constexpr = lse_ptr.dtype.element_ty
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = rows < N
    s = tl.load(prm_ptr + 0).to(acc_t)
    run_max = tl.full((BLOCK,), float("-inf"), acc_t)
    run_sum = tl.zeros((BLOCK,), acc_t)
    sum_z = tl.zeros((BLOCK,), acc_t)
    tgt = tl.zeros((BLOCK,), acc_t)
    best = tl.full((BLOCK,), float("-inf"), acc_t)
    arg = tl.zeros((BLOCK,), tl.int64)
    for sp in range(0, SPLITS):
        off = rows * SPLITS + sp
        run_max, run_sum = lse_merge(run_max, run_sum,
                                     tl.load(pmax_ptr + off, mask=mask, other=float("-inf")),
                                     tl.load(psum_ptr + off, mask=mask, other=0.0))
        sum_z += tl.load(psz_ptr + off, mask=mask, other=0.0)
        tgt += tl.load(ptgt_ptr + off, mask=mask, other=0.0)
        b = tl.load(pbest_ptr + off, mask=mask, other=float("-inf"))
        g = tl.load(parg_ptr + off, mask=mask, other=0)
        upd = (sp == 0) | (b > best) | ((b != b) & (best == best))
        best = tl.where(upd, b, best)
        arg = tl.where(upd, g, arg)
    run_sum = tl.where(mask, run_sum, 1.0)   # rows past N: no log(0)
    tl.store(lse_ptr + rows, lse_finish(run_max, run_sum), mask=mask)
    tl.store(tgt_ptr + rows, tgt, mask=mask)
    tl.store(sz_ptr + rows, sum_z, mask=mask)
    tl.store(maxz_ptr + rows, s * best, mask=mask)
    tl.store(arg_ptr + rows, arg, mask=mask)


@triton.jit(do_not_specialize=["N", "j_chunk", "C_chunk", "NUM_W_CLASSES"])
def bwd_grad_kernel(x_ptr, w_ptr, lab_ptr, idx_ptr, a_ptr, b_ptr, prm_ptr,
                    lse_ptr, gp_ptr, gt_ptr, gs_ptr, h_ptr, stride_h, r_part_ptr, q_part_ptr,
                    N, j_chunk, C_chunk, NUM_W_CLASSES, D, stride_x, stride_w,
                    K: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
                    WRAP: tl.constexpr, GRAD: tl.constexpr, M1_IS_ONE: tl.constexpr,
                    DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (row blocks, class blocks of the chunk). For classes j_chunk + [0, C_chunk):

        G_ij = s * (g_p exp(z_ij - lse_i) + g_t [j = y_i] + g_s) * (psi'(c_ij) if j = y_i)
        h[i, jl*K + k] = G_ij at the arg-max sub-center k, 0 at the others
        r_part[pid_c, i] = sum_j G_ij c_ij        q_part[pid_n, jl*K + k] = sum_i G_ij c_ij

    The caller turns h into dx and dw with two matmuls."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_t: tl.constexpr = a_ptr.dtype.element_ty
    rows, rmask, labels, a = _row_block(pid_n, N, lab_ptr, a_ptr, NORMALIZE, BLOCK_N)
    cl = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    cmask = cl < C_chunk
    cols = j_chunk + cl
    s, m1, m2, m3 = _load_params(prm_ptr, acc_t)
    c, kbest = _class_cosines(x_ptr, w_ptr, idx_ptr, b_ptr, a, rows, rmask, cols, cmask,
                              NUM_W_CLASSES, D, stride_x, stride_w, K, HAS_INDEX, NORMALIZE,
                              DOT_MODE, FP32_PREC, BLOCK_N, BLOCK_C, BLOCK_D)
    is_t, has_t, psi_t, dpsi_t = _target_terms(c, cols, cmask, labels, m1, m2, m3, WRAP,
                                               GRAD, M1_IS_ONE, True)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(acc_t)
    g_p = tl.load(gp_ptr + rows, mask=rmask, other=0.0).to(acc_t)
    g_t = tl.load(gt_ptr + rows, mask=rmask, other=0.0).to(acc_t)
    g_s = tl.load(gs_ptr + rows, mask=rmask, other=0.0).to(acc_t)
    z = s * tl.where(is_t, psi_t[:, None], c)
    dz = g_p[:, None] * tl.exp(z - lse[:, None]) + g_s[:, None] \
        + tl.where(is_t, g_t[:, None], 0.0)
    valid = rmask[:, None] & cmask[None, :]
    g = tl.where(valid, s * dz * tl.where(is_t, dpsi_t[:, None], 1.0), 0.0)
    gc = tl.where(valid, g * c, 0.0)
    tl.store(r_part_ptr + pid_c.to(tl.int64) * N + rows, tl.sum(gc, axis=1), mask=rmask)
    h = g
    h_row = rows[:, None] * stride_h
    q_row = pid_n.to(tl.int64) * C_chunk * K
    for k in tl.static_range(K):
        if K == 1:
            hk = h
            gck = gc
        else:
            hk = tl.where(kbest == k, h, 0.0)
            gck = tl.where(kbest == k, gc, 0.0)
        tl.store(h_ptr + h_row + (cl * K + k)[None, :], hk.to(h_ptr.dtype.element_ty),
                 mask=valid)
        tl.store(q_part_ptr + q_row + cl * K + k, tl.sum(gck, axis=0), mask=cmask)
