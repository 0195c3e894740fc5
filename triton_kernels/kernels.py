"""The Triton kernels of the triton backend (launchers and the design: launch.py).

* :func:`inv_norm_kernel`: inverse L2 norms of rows (of x, or of the shard's rows of w
  read through the Partial-FC index).
* :func:`target_kernel`: per row, the target class's cosine (max over its sub-centers),
  margin logit s psi(c), psi'(c) and sub-center; with BWD, also the target's entry of the
  gradient tile H (below). One row dot product each: the tile kernels never evaluate the
  margin.
* :func:`fwd_kernel`: for a block of rows and a split of the shard's classes, the partial
  online log-sum-exp over the non-target classes, their sum of logits, and the running
  max of the logits (all classes, no margin) with its class: one max serves the lse and
  the top-1.
* :func:`fwd_combine_kernel`: merges the splits' partials and adds the target's margin
  logit.
* :func:`grad_kernel`: recomputes a [BLOCK_N, BLOCK_C] tile of logits exactly as the
  forward does and writes H_ij = a_i b_j dL/dc_ij (routed to the arg-max sub-center) into
  the backward's bounded workspace, in full tiles (16-byte stores).
* :func:`bwd_mm_kernel`: both gradient products of a chunk in one launch:
  dX partials += H @ W_chunk (raw rows of w, through the index) and U partials =
  H^T @ X (raw x), split over K where the tiles alone would not fill the GPU.
* :func:`proj_rows_kernel`: sums a row's split partials and removes the radial part
  (the normalization backward): dx_i = V_i - <x_i, V_i> a_i^2 x_i, and the same for dw.
* :func:`bias_sum_kernel`: dbias of a backward chunk, the sum in order of grad_kernel's
  per-row-block column sums of dL/dv (deterministic, no atomics).

The bias, soft cap and interclass filter (docs/design.md section 3) are constexpr
switches (HAS_BIAS, SOFTCAP, INTERCLASS; ``FILTER`` is the gradient filter): off, the
kernels compile to exactly their code without these terms.

Conventions: the last dimension of x and w is contiguous; row offsets are int64 (N*D and
C*K*D may pass 2^31); column indices within the shard are int32 (C < 2^31); ``a_ptr``'s
element type is the accumulation type (float32, or float64 for float64 inputs); margins
are read from a float64 parameter tensor [s, m1, m2, m3]. Logits inside the tile kernels
are in base 2 (y = z log2(e), exp2 instead of exp: one multiply less per logit). The
per-element math comes from ``math.py`` only.
"""
import triton
import triton.language as tl

from .math import clamp_unit, from_base2, interclass_filtered, inv_norm, margin_dpsi, \
    margin_psi, radial, softcap, softcap_and_grad, softcap_grad, to_base2

# How a tile's dot products are computed (``DOT_MODE``):
DOT_TENSOR_CORE = 0   # fp16 / bf16 operands, fp32 accumulation
DOT_FP32 = 1          # fp32 operands, precision by FP32_PREC (0 ieee, 1 tf32, 2 tf32x3)
DOT_UPCAST = 2        # bf16 upcast to fp32 first (the interpreter's bf16 dot is wrong)
DOT_FP64 = 3          # float64: broadcast multiply + sum (no fp64 tensor-core path needed)


@triton.jit
def _dot(a, b, acc, DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr):
    """acc + a [M, K] @ b [K, N] in the accumulation dtype."""
    if DOT_MODE == 0:
        acc = tl.dot(a, b, acc)
    elif DOT_MODE == 1:
        if FP32_PREC == 0:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif FP32_PREC == 1:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
    elif DOT_MODE == 2:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    return acc


@triton.jit
def _logit_tile(x_ptr, w_ptr, x_off, w_off, rmask, wmask, D, acc,
                DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc [BN, BC] += x[rows] . w[wrows]^T over D; x_off [BN], w_off [BC] int64 offsets
    of the rows' starts; masked rows / columns read zeros. The forward and the backward
    run exactly this loop on the same tiles, so their logits are bitwise equal."""
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        xt = tl.load(x_ptr + x_off[:, None] + dd[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        wt = tl.load(w_ptr + w_off[None, :] + dd[:, None],
                     mask=wmask[None, :] & dmask[:, None], other=0.0)   # [BD, BC]
        acc = _dot(xt, wt, acc, DOT_MODE, FP32_PREC)
    return acc


@triton.jit
def _class_rows(idx_ptr, cols, cmask, NUM_W_CLASSES, HAS_INDEX: tl.constexpr):
    """Classes of w (int64) of shard positions ``cols`` and the mask of the readable ones."""
    if HAS_INDEX:
        cls = tl.load(idx_ptr + cols, mask=cmask, other=0)
        return cls, cmask & (cls >= 0) & (cls < NUM_W_CLASSES)   # never read outside w
    return cols.to(tl.int64), cmask


@triton.jit
def _scaled_logits(x_ptr, w_ptr, idx_ptr, b_ptr, row_scale, rows, rmask, cols, cmask,
                   NUM_W_CLASSES, D, stride_x, stride_w,
                   K: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
                   DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Base-2 logits y [BN, BC] = row_scale_i * b_j * <x_i, w_j> of rows x shard classes
    ``cols`` (row_scale = s a_i log2(e); b = 1 without normalization), the max over the K
    sub-centers, and the arg-max sub-center [BN, BC] (int32)."""
    acc_t: tl.constexpr = row_scale.dtype
    cls, wmask = _class_rows(idx_ptr, cols, cmask, NUM_W_CLASSES, HAS_INDEX)
    x_off = rows * stride_x
    best = tl.zeros((BLOCK_N, BLOCK_C), acc_t)
    kbest = tl.zeros((BLOCK_N, BLOCK_C), tl.int32)
    for k in tl.static_range(K):
        dot = _logit_tile(x_ptr, w_ptr, x_off, (cls * K + k) * stride_w, rmask, wmask, D,
                          tl.zeros((BLOCK_N, BLOCK_C), acc_t), DOT_MODE, FP32_PREC, BLOCK_D)
        if NORMALIZE:
            bk = tl.load(b_ptr + cols * K + k, mask=cmask, other=0.0)
            y = (dot * row_scale[:, None]) * bk[None, :]
        else:
            y = dot * row_scale[:, None]
        if k == 0:
            best = y
        else:
            upd = (y > best) | (y != y)   # a NaN sticks, as in torch.max
            best = tl.where(upd, y, best)
            kbest = tl.where(upd, k, kbest)
    return best, kbest


@triton.jit
def _rows(pid_n, N, lab_ptr, BLOCK_N: tl.constexpr):
    """Rows (int64) of row block ``pid_n``, their mask and int32 labels (-1 past N)."""
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    labels = tl.load(lab_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    return rows, rmask, labels


@triton.jit
def _row_norms(a_ptr, rows, rmask, NORMALIZE: tl.constexpr, acc_t: tl.constexpr):
    if NORMALIZE:
        return tl.load(a_ptr + rows, mask=rmask, other=0.0)
    return tl.full(rows.shape, 1.0, acc_t)


@triton.jit
def _load_params(prm_ptr, dtype: tl.constexpr):
    s = tl.load(prm_ptr + 0).to(dtype)
    m1 = tl.load(prm_ptr + 1).to(dtype)
    m2 = tl.load(prm_ptr + 2).to(dtype)
    m3 = tl.load(prm_ptr + 3).to(dtype)
    return s, m1, m2, m3


@triton.jit
def _load_terms(prm_ptr, s, dtype: tl.constexpr):
    """The new logit terms' scalars in base 2 (params [4] = softcap, [5] = interclass):
    (cap2 = softcap log2 e, 1 / cap2, thr2 = s interclass log2 e); the tiles compare the
    base-2 logits y = s c log2 e with thr2 and cap them at cap2 (the soft cap is
    scale-equivariant)."""
    cap2 = to_base2(tl.load(prm_ptr + 4).to(dtype))
    thr2 = to_base2(s * tl.load(prm_ptr + 5).to(dtype))
    return cap2, 1.0 / tl.where(cap2 > 0.0, cap2, 1.0), thr2   # (softcap 0: unused)


@triton.jit
def _bias_of(bias_ptr, idx_ptr, cols, cmask, NUM_W_CLASSES, HAS_INDEX: tl.constexpr,
             acc_t: tl.constexpr):
    """bias[class of shard position j] for the columns ``cols`` (0 where masked), in the
    accumulation type."""
    cls, ok = _class_rows(idx_ptr, cols, cmask, NUM_W_CLASSES, HAS_INDEX)
    return tl.load(bias_ptr + cls, mask=ok, other=0.0).to(acc_t)


# Shape-like integer arguments that only bound masks and loops are not specialized on
# (Triton otherwise compiles a variant per "== 1" / "% 16 == 0" of each: every new N or
# chunk start of the backward would cost a recompile); D, the row strides and the
# workspace's leading dimension are, for aligned vector accesses.
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


@triton.jit(do_not_specialize=["N", "NUM_W_CLASSES"])
def target_kernel(x_ptr, w_ptr, lab_ptr, idx_ptr, a_ptr, b_ptr, prm_ptr, bias_ptr,
                  tz_ptr, tc_ptr, tk_ptr, lse_ptr, gp_ptr, gt_ptr, gs_ptr, th_ptr, tv_ptr,
                  N, C, NUM_W_CLASSES, D, stride_x, stride_w,
                  K: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
                  WRAP: tl.constexpr, GRAD: tl.constexpr, M1_IS_ONE: tl.constexpr,
                  BWD: tl.constexpr, SCALE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row i with a target t = label_i (>= 0): c_t = max over sub-centers k of the
    cosine (clamped to [-1, 1]; the plain dot product without normalization), with the
    target's bias b_t (HAS_BIAS, else 0) and the soft cap T (SOFTCAP, else the identity),

        tz[i] = T(s psi(c_t) + b_t)               (0 without a target)
        tc[i] = T(s c_t + b_t)                    (0 without a target: the tiles' plain
                                                   logit of the target column)
        tk[i] = the arg-max sub-center            (int32)

    and with BWD, dL/dv at the target and the target's entry of the gradient tile (a_i
    b_t only with SCALE_H),

        tv[i] = T'(s psi(c_t) + b_t) (g_p exp(tz - lse) + g_t + g_s)   (HAS_BIAS only)
        th[i] = a_i b_t s psi'(c_t) tv[i].

    A label outside [0, C) counts as no target (never read outside the shard)."""
    pid = tl.program_id(0)
    acc_t: tl.constexpr = a_ptr.dtype.element_ty
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < N
    lab = tl.load(lab_ptr + rows, mask=rmask, other=-1)
    has = rmask & (lab >= 0) & (lab < C)
    labc = tl.where(has, lab, 0)
    cls, valid = _class_rows(idx_ptr, labc, has, NUM_W_CLASSES, HAS_INDEX)
    a = _row_norms(a_ptr, rows, rmask, NORMALIZE, acc_t)
    s, m1, m2, m3 = _load_params(prm_ptr, acc_t)
    best = tl.zeros((BLOCK_M,), acc_t)
    bb = tl.zeros((BLOCK_M,), acc_t)
    kb = tl.zeros((BLOCK_M,), tl.int32)
    for k in tl.static_range(K):
        wrow = cls * K + k
        dot = tl.zeros((BLOCK_M,), acc_t)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < D
            xv = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :],
                         mask=rmask[:, None] & dm[None, :], other=0.0).to(acc_t)
            wv = tl.load(w_ptr + wrow[:, None] * stride_w + dd[None, :],
                         mask=valid[:, None] & dm[None, :], other=0.0).to(acc_t)
            dot += tl.sum(xv * wv, axis=1)
        if NORMALIZE:
            bk = tl.load(b_ptr + labc * K + k, mask=has, other=0.0)
            c = clamp_unit(dot * a * bk)
        else:
            bk = tl.full((BLOCK_M,), 1.0, acc_t)
            c = dot
        if k == 0:
            best = c
            bb = bk
        else:
            upd = (c > best) | (c != c)
            best = tl.where(upd, c, best)
            bb = tl.where(upd, bk, bb)
            kb = tl.where(upd, k, kb)
    psi = margin_psi(best, m1, m2, m3, WRAP, M1_IS_ONE)
    vt = s * psi
    vc = s * best
    if HAS_BIAS:
        bt = tl.load(bias_ptr + cls, mask=valid, other=0.0).to(acc_t)
        vt = vt + bt
        vc = vc + bt
    if SOFTCAP:
        cap = tl.load(prm_ptr + 4).to(acc_t)
        inv_cap = 1.0 / cap
        zt = softcap(vt, cap, inv_cap)
        vc = softcap(vc, cap, inv_cap)
    else:
        zt = vt
    tz = tl.where(has, zt, 0.0)
    tl.store(tz_ptr + rows, tz, mask=rmask)
    tl.store(tc_ptr + rows, tl.where(has, vc, 0.0), mask=rmask)
    tl.store(tk_ptr + rows, kb, mask=rmask)
    if BWD:
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(acc_t)
        g_p = tl.load(gp_ptr + rows, mask=rmask, other=0.0).to(acc_t)
        g_t = tl.load(gt_ptr + rows, mask=rmask, other=0.0).to(acc_t)
        g_s = tl.load(gs_ptr + rows, mask=rmask, other=0.0).to(acc_t)
        dpsi = margin_dpsi(best, m1, m2, WRAP, GRAD, M1_IS_ONE)
        dv = g_p * tl.exp(tz - lse) + g_t + g_s
        if SOFTCAP:
            dv = dv * softcap_grad(vt, inv_cap)
        if HAS_BIAS:
            tl.store(tv_ptr + rows, tl.where(has, dv, 0.0), mask=rmask)
        g = s * dpsi * dv
        if SCALE_H:
            g = g * a * bb
        tl.store(th_ptr + rows, tl.where(has, g, 0.0), mask=rmask)


@triton.jit
def _fwd_tile(x_ptr, w_ptr, idx_ptr, b_ptr, bias_ptr, row_scale, rows, rmask, labels, j0,
              j_end, run_max, run_sum, sum_y, arg, lmax, first, cap2, inv_cap2, thr2,
              NUM_W_CLASSES, D, stride_x, stride_w,
              K: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
              DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr, MASKED: tl.constexpr,
              HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, INTERCLASS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold the class tile starting at j0 into the running (max, sum, sum of z, arg[,
    lse max]). MASKED: the tile may pass j_end (only a split's last tile); the others
    carry no column mask at all.

    The top-1 runs over m = y + bias (base 2; y = s c log2 e, no margin, no filter). The
    logits are z = T(v), v = (filtered ? 0 : y) + bias. Without SOFTCAP and INTERCLASS
    z = m, and the running max of m also shifts the exponential sum; with either, the
    sum has its own running max ``lmax`` (the filter may drop the largest logits far
    below the top-1's max)."""
    acc_t: tl.constexpr = row_scale.dtype
    cols = j0 + tl.arange(0, BLOCK_C)
    if MASKED:
        cmask = cols < j_end
    else:
        cmask = tl.full((BLOCK_C,), True, tl.int1)
    y, _kb = _scaled_logits(x_ptr, w_ptr, idx_ptr, b_ptr, row_scale, rows, rmask, cols,
                            cmask, NUM_W_CLASSES, D, stride_x, stride_w, K, HAS_INDEX,
                            NORMALIZE, DOT_MODE, FP32_PREC, BLOCK_N, BLOCK_C, BLOCK_D)
    if HAS_BIAS:
        bias2 = to_base2(_bias_of(bias_ptr, idx_ptr, cols, cmask, NUM_W_CLASSES, HAS_INDEX,
                                  acc_t))
        m = y + bias2[None, :]
    else:
        m = y
    if MASKED:
        m = tl.where(cmask[None, :], m, float("-inf"))
    tile_max = tl.max(m, axis=1)
    tile_arg = tl.argmax(m, axis=1).to(tl.int32) + j0
    # the first tile always sets the arg-max (NaN rows included); later tiles only when
    # strictly larger, so ties keep the lower class
    upd = first | (tile_max > run_max)
    arg = tl.where(upd, tile_arg, arg)
    new_max = tl.maximum(run_max, tile_max)
    is_t = cols[None, :] == labels[:, None]
    if SOFTCAP or INTERCLASS:
        v = m
        if INTERCLASS:
            filt = interclass_filtered(y, is_t, thr2)
            if HAS_BIAS:
                v = tl.where(filt, bias2[None, :], v)
            else:
                v = tl.where(filt, 0.0, v)
        if SOFTCAP:
            z = softcap(v, cap2, inv_cap2)
        else:
            z = v
        if MASKED:
            z = tl.where(cmask[None, :], z, float("-inf"))
        # the target's exp is left out (its margin logit is added in the combine)
        zt = tl.where(is_t, float("-inf"), z)
        new_l = tl.maximum(lmax, tl.max(zt, axis=1))
        ref = tl.where(new_l == float("-inf"), 0.0, new_l)
        run_sum = run_sum * tl.exp2(lmax - ref) + tl.sum(tl.exp2(zt - ref[:, None]), axis=1)
        lmax = new_l
    else:
        z = m
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        # the target's exp is left out here (its margin logit is added in the combine);
        # the sum of z keeps it (the combine subtracts the target's plain logit: no mask
        # per z)
        zt = tl.where(is_t, float("-inf"), z)
        run_sum = run_sum * tl.exp2(run_max - ref) + tl.sum(tl.exp2(zt - ref[:, None]),
                                                           axis=1)
    if MASKED:
        z = tl.where(cmask[None, :], z, 0.0)
    sum_y += tl.sum(z, axis=1)
    return new_max, run_sum, sum_y, arg, lmax


@triton.jit(do_not_specialize=["N", "C", "NUM_W_CLASSES", "cls_per_split"])
def fwd_kernel(x_ptr, w_ptr, lab_ptr, idx_ptr, a_ptr, b_ptr, prm_ptr, bias_ptr,
               pmax_ptr, psum_ptr, psz_ptr, parg_ptr, plm_ptr,
               N, C, NUM_W_CLASSES, D, stride_x, stride_w, cls_per_split,
               K: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
               DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr, HAS_BIAS: tl.constexpr,
               SOFTCAP: tl.constexpr, INTERCLASS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (row blocks, class splits). Partials [N, splits], in base 2 (y = z log2 e):
    the running max of s c + bias over all the split's classes (no margin, no filter, no
    cap) and its class, the sum of exp2(z - shift) over the non-target classes and the
    sum of all their z; the shift is that max, or with SOFTCAP / INTERCLASS the
    non-target z's own running max, stored in plm. Whole tiles first, without column
    masks; then the split's partial last tile, if any."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_t: tl.constexpr = a_ptr.dtype.element_ty
    rows, rmask, labels = _rows(pid_n, N, lab_ptr, BLOCK_N)
    a = _row_norms(a_ptr, rows, rmask, NORMALIZE, acc_t)
    s = tl.load(prm_ptr).to(acc_t)
    row_scale = a * to_base2(s)
    if SOFTCAP or INTERCLASS:
        cap2, inv_cap2, thr2 = _load_terms(prm_ptr, s, acc_t)
    else:   # unused
        cap2 = s
        inv_cap2 = s
        thr2 = s
    run_max = tl.full((BLOCK_N,), float("-inf"), acc_t)
    run_sum = tl.zeros((BLOCK_N,), acc_t)
    sum_y = tl.zeros((BLOCK_N,), acc_t)
    arg = tl.zeros((BLOCK_N,), tl.int32)
    lmax = tl.full((BLOCK_N,), float("-inf"), acc_t)
    j_start = pid_s * cls_per_split
    j_end = j_start + tl.minimum(cls_per_split, C - j_start)   # no int32 overflow
    j_full = j_start + (j_end - j_start) // BLOCK_C * BLOCK_C
    for j0 in range(j_start, j_full, BLOCK_C):
        run_max, run_sum, sum_y, arg, lmax = _fwd_tile(
            x_ptr, w_ptr, idx_ptr, b_ptr, bias_ptr, row_scale, rows, rmask, labels, j0,
            j_end, run_max, run_sum, sum_y, arg, lmax, j0 == j_start, cap2, inv_cap2, thr2,
            NUM_W_CLASSES, D, stride_x, stride_w, K, HAS_INDEX, NORMALIZE, DOT_MODE,
            FP32_PREC, False, HAS_BIAS, SOFTCAP, INTERCLASS, BLOCK_N, BLOCK_C, BLOCK_D)
    if j_full < j_end:
        run_max, run_sum, sum_y, arg, lmax = _fwd_tile(
            x_ptr, w_ptr, idx_ptr, b_ptr, bias_ptr, row_scale, rows, rmask, labels, j_full,
            j_end, run_max, run_sum, sum_y, arg, lmax, j_full == j_start, cap2, inv_cap2,
            thr2, NUM_W_CLASSES, D, stride_x, stride_w, K, HAS_INDEX, NORMALIZE, DOT_MODE,
            FP32_PREC, True, HAS_BIAS, SOFTCAP, INTERCLASS, BLOCK_N, BLOCK_C, BLOCK_D)
    off = rows * tl.num_programs(1) + pid_s   # partials are [N, splits], int64 offsets
    tl.store(pmax_ptr + off, run_max, mask=rmask)
    tl.store(psum_ptr + off, run_sum, mask=rmask)
    tl.store(psz_ptr + off, sum_y, mask=rmask)
    tl.store(parg_ptr + off, arg, mask=rmask)
    if SOFTCAP or INTERCLASS:
        tl.store(plm_ptr + off, lmax, mask=rmask)


@triton.jit(do_not_specialize=["N", "SPLITS"])
def fwd_combine_kernel(pmax_ptr, psum_ptr, psz_ptr, parg_ptr, plm_ptr, tz_ptr, tc_ptr,
                       lab_ptr, prm_ptr, lse_ptr, tgt_ptr, sz_ptr, maxz_ptr, arg_ptr, N,
                       SPLITS, SEP_MAX: tl.constexpr, SOFTCAP: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Merge the [N, SPLITS] base-2 partials of fwd_kernel and the target's margin logit
    tz into lse, target, sum_z (the partials' sum of all logits, with the target's plain
    logit tc replaced by tz), max_z (= T(max_j s c_ij + bias_j), no margin, T the soft
    cap with SOFTCAP) and the arg-max (a tie between splits keeps the lower class, as
    within a split). The exponential sums' shifts are plm (SEP_MAX), else pmax (pass
    pmax as plm then)."""
    pid = tl.program_id(0)
    acc_t: tl.constexpr = lse_ptr.dtype.element_ty
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = rows < N
    has = tl.load(lab_ptr + rows, mask=mask, other=-1) >= 0
    tz = tl.load(tz_ptr + rows, mask=mask, other=0.0)
    ty = to_base2(tz)
    big = tl.full((BLOCK,), float("-inf"), acc_t)
    arg = tl.zeros((BLOCK,), tl.int32)
    for sp in range(0, SPLITS):
        m = tl.load(pmax_ptr + rows * SPLITS + sp, mask=mask, other=float("-inf"))
        g = tl.load(parg_ptr + rows * SPLITS + sp, mask=mask, other=0)
        upd = (sp == 0) | (m > big)
        arg = tl.where(upd, g, arg)
        big = tl.maximum(big, m)
    if SEP_MAX:
        lbig = tl.full((BLOCK,), float("-inf"), acc_t)
        for sp in range(0, SPLITS):
            lbig = tl.maximum(lbig, tl.load(plm_ptr + rows * SPLITS + sp, mask=mask,
                                            other=float("-inf")))
    else:
        lbig = big
    top = tl.where(has, tl.maximum(lbig, ty), lbig)
    ref = tl.where(top == float("-inf"), 0.0, top)
    total = tl.where(has, tl.exp2(ty - ref), 0.0)
    sum_y = tl.zeros((BLOCK,), acc_t)
    for sp in range(0, SPLITS):
        off = rows * SPLITS + sp
        m = tl.load(plm_ptr + off, mask=mask, other=float("-inf"))
        total += tl.load(psum_ptr + off, mask=mask, other=0.0) * tl.exp2(m - ref)
        sum_y += tl.load(psz_ptr + off, mask=mask, other=0.0)
    total = tl.where(mask, total, 1.0)   # rows past N: no log(0)
    lse2 = ref + tl.log2(total)
    # lse >= the target's logit. At huge logits (normalize=False, |z| ~ 1e34 in fp32) the
    # running max, the plain target logit of the tiles, and tz (the target kernel's own
    # dot product) differ by rounding errors that are huge in absolute terms, so every
    # exp2 may underflow (lse = -inf); the bound restores lse = the target's logit there.
    # (A comparison, not tl.maximum: NaN stays NaN.)
    lse2 = tl.where(has & (lse2 < ty), ty, lse2)
    tl.store(lse_ptr + rows, from_base2(lse2), mask=mask)
    tl.store(tgt_ptr + rows, tz, mask=mask)
    tc = tl.load(tc_ptr + rows, mask=mask, other=0.0)
    tl.store(sz_ptr + rows, from_base2(sum_y) - tc + tz, mask=mask)
    # a NaN logit makes the row's sum of logits NaN, while the running max skips it
    # (comparisons with NaN are false): max_z is NaN then, as torch.max gives
    big = tl.where(sum_y != sum_y, sum_y, big)
    big = from_base2(big)
    if SOFTCAP:
        cap = tl.load(prm_ptr + 4).to(acc_t)
        big = softcap(big, cap, 1.0 / cap)
    tl.store(maxz_ptr + rows, big, mask=mask)
    tl.store(arg_ptr + rows, arg.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=["N", "j_chunk", "C_chunk", "NUM_W_CLASSES"])
def grad_kernel(x_ptr, w_ptr, lab_ptr, idx_ptr, a_ptr, b_ptr, prm_ptr, bias_ptr,
                lse_ptr, gp_ptr, gs_ptr, th_ptr, tk_ptr, tv_ptr, h_ptr, ld_h, flag_ptr,
                dbp_ptr, eps, N, j_chunk, C_chunk, NUM_W_CLASSES, D, stride_x, stride_w,
                K: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
                DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr, FILTER: tl.constexpr,
                SCALE_H: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                INTERCLASS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (row blocks, class tiles of the chunk). For classes j_chunk + [0, C_chunk):

        H[i, jl*K + k] = a_i b_j s dL/dv_ij                         at the arg-max k
                       = th_i (from target_kernel)                  at the target
                       = 0                                          at other sub-centers
                                                                    and filtered logits
        dL/dv_ij = T'(v_ij) (g_p exp(z_ij - lse_i) + g_s)           (non-target)

    i.e. H = a b dL/dc; without SCALE_H (float16: the workspace's range), H = dL/dc and
    the products scale the rows they read instead. The logits are recomputed exactly as
    in fwd_kernel (z = T(v), v = (filtered ? 0 : s c) + bias; T' = 1 without SOFTCAP).
    Tiles are stored whole, the grid covering all of the workspace's padded width ld_h
    (columns past the chunk as zeros, which the products then read instead of masking),
    so every store is a full 16-byte vector.

    HAS_BIAS: the tile's column sums of dL/dv (the target's entry tv from target_kernel;
    filtered logits included) go to dbp[pid_n, pid_c * BLOCK_C + [0, BLOCK_C)] (the
    chunk's [row blocks, ld_h / K] partials, zeros past the chunk), summed over the row
    blocks in order by bias_sum_kernel: deterministic, no atomics.

    FILTER (the gradient filter, eps > 0): a tile without a target whose softmax values
    are all below eps drops its p-term; if no row of it has a smoothing term either, the
    tile is zero and its flag (flag[pid_n, pid_c], int8) is 0, so the products skip it."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_t: tl.constexpr = a_ptr.dtype.element_ty
    rows, rmask, labels = _rows(pid_n, N, lab_ptr, BLOCK_N)
    a = _row_norms(a_ptr, rows, rmask, NORMALIZE, acc_t)
    s = tl.load(prm_ptr).to(acc_t)
    cl = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cl < C_chunk
    cols = j_chunk + cl
    y, kbest = _scaled_logits(x_ptr, w_ptr, idx_ptr, b_ptr, a * to_base2(s), rows, rmask,
                              cols, cmask, NUM_W_CLASSES, D, stride_x, stride_w, K,
                              HAS_INDEX, NORMALIZE, DOT_MODE, FP32_PREC, BLOCK_N, BLOCK_C,
                              BLOCK_D)
    lse2 = to_base2(tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(acc_t))
    g_p = tl.load(gp_ptr + rows, mask=rmask, other=0.0).to(acc_t)
    g_s = tl.load(gs_ptr + rows, mask=rmask, other=0.0).to(acc_t)
    th = tl.load(th_ptr + rows, mask=rmask, other=0.0)
    # per row: H = (c1 p + c0) b_j with c1 = s g_p a_i, c0 = s g_s a_i (SCALE_H)
    c1 = s * g_p
    c0 = s * g_s
    if SCALE_H:
        c1 = c1 * a
        c0 = c0 * a
    is_t = cols[None, :] == labels[:, None]
    valid = rmask[:, None] & cmask[None, :]
    hrow = rows[:, None] * ld_h
    FEATURES: tl.constexpr = HAS_BIAS or SOFTCAP or INTERCLASS
    if FEATURES:
        z = y
        if HAS_BIAS:
            bias2 = to_base2(_bias_of(bias_ptr, idx_ptr, cols, cmask, NUM_W_CLASSES,
                                      HAS_INDEX, acc_t))
            z = z + bias2[None, :]
        if SOFTCAP or INTERCLASS:
            cap2, inv_cap2, thr2 = _load_terms(prm_ptr, s, acc_t)
        if INTERCLASS:
            filt = interclass_filtered(y, is_t, thr2)
            if HAS_BIAS:
                z = tl.where(filt, bias2[None, :], z)
            else:
                z = tl.where(filt, 0.0, z)
        if SOFTCAP:
            z, tp = softcap_and_grad(z, cap2, inv_cap2)
        p = tl.exp2(z - lse2[:, None])
    else:
        p = tl.exp2(y - lse2[:, None])
    # a softmax value is at most 1; at huge logits the recomputed y may pass lse by a
    # rounding error that is huge in absolute terms (exp2 would overflow). NaN stays NaN.
    p = tl.where(p > 1.0, 1.0, p)
    if FILTER:
        p_max = tl.max(tl.max(tl.where(valid, p, 0.0), axis=1), axis=0)
        t_in = tl.max(tl.max(tl.where(is_t & valid, 1, 0), axis=1), axis=0)
        drop = (p_max < eps) & (t_in == 0)
        p = tl.where(drop, 0.0, p)
        live = tl.where(drop & (tl.max(tl.abs(c0), axis=0) == 0.0), 0, 1)
        tl.store(flag_ptr + pid_n * tl.num_programs(1) + pid_c, live.to(tl.int8))
    if FEATURES:
        dv = g_p[:, None] * p + g_s[:, None]
        if SOFTCAP:
            dv = dv * tp
        if HAS_BIAS:
            tv = tl.load(tv_ptr + rows, mask=rmask, other=0.0)
            db = tl.where(valid, tl.where(is_t, tv[:, None], dv), 0.0)
            tl.store(dbp_ptr + pid_n * (tl.num_programs(1) * BLOCK_C) + cl,
                     tl.sum(db, axis=0))
        sa = tl.full((BLOCK_N,), 1.0, acc_t) * s      # H = s a_i dL/dv (SCALE_H)
        if SCALE_H:
            sa = sa * a
        hv = sa[:, None] * dv
        if INTERCLASS:
            hv = tl.where(filt, 0.0, hv)
    else:
        hv = c1[:, None] * p + c0[:, None]
    for k in tl.static_range(K):
        h = hv
        if NORMALIZE and SCALE_H:
            bk = tl.load(b_ptr + cols * K + k, mask=cmask, other=0.0)
            h = h * bk[None, :]
        if K == 1:
            h = tl.where(is_t, th[:, None], h)
        else:
            tk = tl.load(tk_ptr + rows, mask=rmask, other=0)
            h = tl.where(is_t, tl.where(tk[:, None] == k, th[:, None], 0.0),
                         tl.where(kbest == k, h, 0.0))
        h = tl.where(valid, h, 0.0)
        tl.store(h_ptr + hrow + (cl * K + k)[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=rmask[:, None])


@triton.jit(do_not_specialize=["ROW_BLOCKS", "j_chunk", "C_chunk"])
def bias_sum_kernel(dbp_ptr, ld, ROW_BLOCKS, out_ptr, j_chunk, C_chunk,
                    BLOCK: tl.constexpr):
    """out[j_chunk + j] = sum over the row blocks rb (in order) of dbp[rb, j], for j <
    C_chunk: the chunk's dbias over shard positions (each written once)."""
    pid = tl.program_id(0)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    m = j < C_chunk
    acc = tl.zeros((BLOCK,), out_ptr.dtype.element_ty)
    for rb in range(0, ROW_BLOCKS):
        acc += tl.load(dbp_ptr + rb * ld + j, mask=m, other=0.0)
    tl.store(out_ptr + j_chunk + j, acc, mask=m)


@triton.jit
def _shard_row_of_w(idx_ptr, p, pmask, K: tl.constexpr, NUM_W_CLASSES,
                    HAS_INDEX: tl.constexpr):
    """Rows of w (int64) of shard rows p (class p // K, sub-center p % K), and which of
    them are readable (in pmask, and for an index: a class of w)."""
    p = p.to(tl.int64)
    if HAS_INDEX:
        cls = tl.load(idx_ptr + p // K, mask=pmask, other=0)
        ok = pmask & (cls >= 0) & (cls < NUM_W_CLASSES)
        return tl.where(ok, cls, 0) * K + p % K, ok
    return p, pmask


@triton.jit
def _mm_tile(a_ptr, b_ptr, idx_ptr, scale_ptr, a_row, a_col_stride, b_stride, b_row0,
             b_col, k_lo, k_end, k_valid, amask, bmask, acc, NUM_W_CLASSES, flag_base,
             flag_div, flag_stride, A_T: tl.constexpr, B_SHARD_ROWS: tl.constexpr,
             K: tl.constexpr, HAS_INDEX: tl.constexpr, DOT_MODE: tl.constexpr,
             FP32_PREC: tl.constexpr, FILTER: tl.constexpr, SCALE_B: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """acc [BM, BN] += A[:, k_lo:k_end] @ B[k_lo:k_end, :] for one output tile (k is
    int32; k >= k_valid reads zeros of B).

    A is the workspace H. Not A_T: element (m, k) at a_row[m] + k (columns past the
    chunk are H's zero padding, so only rows are masked: whole-vector loads). A_T: the
    [BK, BM] tile at k * a_col_stride + a_row[m] (rows k < k_valid), transposed. B: row k
    is row k of b (b_stride apart), or with B_SHARD_ROWS the row of w of shard row
    b_row0 + k (through the index); column b_col[n]. SCALE_B: each row of B is scaled by
    scale[b_row0 + k] as it is loaded (an inverse norm: the unit rows a x or b w, in
    B's dtype). FILTER: a K step whose gradient tile is flagged zero
    (flag_base[(k0 // flag_div) * flag_stride] == 0) is skipped (the loop is then not
    software-pipelined: the filter pays off only where most tiles are dropped)."""
    for k0 in range(k_lo, k_end, BLOCK_K):
        if FILTER:
            if tl.load(flag_base + (k0 // flag_div) * flag_stride) != 0:
                acc = _mm_step(a_ptr, b_ptr, idx_ptr, scale_ptr, a_row, a_col_stride,
                               b_stride, b_row0, b_col, k0, k_valid, amask, bmask, acc,
                               NUM_W_CLASSES, A_T, B_SHARD_ROWS, K, HAS_INDEX, DOT_MODE,
                               FP32_PREC, SCALE_B, BLOCK_K)
        else:
            acc = _mm_step(a_ptr, b_ptr, idx_ptr, scale_ptr, a_row, a_col_stride, b_stride,
                           b_row0, b_col, k0, k_valid, amask, bmask, acc, NUM_W_CLASSES,
                           A_T, B_SHARD_ROWS, K, HAS_INDEX, DOT_MODE, FP32_PREC, SCALE_B,
                           BLOCK_K)
    return acc


@triton.jit
def _mm_step(a_ptr, b_ptr, idx_ptr, scale_ptr, a_row, a_col_stride, b_stride, b_row0,
             b_col, k0, k_valid, amask, bmask, acc, NUM_W_CLASSES, A_T: tl.constexpr,
             B_SHARD_ROWS: tl.constexpr, K: tl.constexpr, HAS_INDEX: tl.constexpr,
             DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr, SCALE_B: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """One K step of _mm_tile: acc + A[:, k0:k0+BK] @ B[k0:k0+BK, :]."""
    kk = k0 + tl.arange(0, BLOCK_K)
    km = kk < k_valid
    if A_T:
        at = tl.load(a_ptr + kk[:, None].to(tl.int64) * a_col_stride + a_row[None, :],
                     mask=km[:, None], other=0.0)
        at = tl.trans(at)
    else:
        at = tl.load(a_ptr + a_row[:, None] + kk[None, :], mask=amask[:, None], other=0.0)
    if B_SHARD_ROWS:
        brow, bm = _shard_row_of_w(idx_ptr, b_row0 + kk, km, K, NUM_W_CLASSES, HAS_INDEX)
    else:
        brow = kk.to(tl.int64)
        bm = km
    bt = tl.load(b_ptr + brow[:, None] * b_stride + b_col[None, :],
                 mask=bm[:, None] & bmask[None, :], other=0.0)
    if SCALE_B:
        sc = tl.load(scale_ptr + b_row0 + kk, mask=km, other=0.0)
        bt = (bt.to(sc.dtype) * sc[:, None]).to(bt.dtype)
    return _dot(at, bt, acc, DOT_MODE, FP32_PREC)


@triton.jit(do_not_specialize=["N", "j_chunk", "C_chunk", "NUM_W_CLASSES", "TILES_X"])
def bwd_mm_kernel(h_ptr, ld_h, x_ptr, w_ptr, idx_ptr, a_ptr, b_ptr, vx_ptr, uw_ptr,
                  flag_ptr, N, j_chunk, C_chunk, NUM_W_CLASSES, D, stride_x, stride_w,
                  TILES_X, SPLIT_X, SPLIT_W, FIRST, FLAG_COLS, FLAG_ROWS, FLAG_W,
                  K: tl.constexpr, HAS_INDEX: tl.constexpr,
                  DOT_MODE: tl.constexpr, FP32_PREC: tl.constexpr, FILTER: tl.constexpr,
                  SCALE_B: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Both products of one backward chunk (R = C_chunk K rows of w), one launch:

    programs [0, TILES_X):  dX partials  vx[s] (+)= H[:, part s] @ W_chunk[part s]
                            ([N, D] fp32 tiles, SPLIT_X parts of the chunk's R columns;
                            FIRST: the first chunk writes instead of adding)
    programs [TILES_X, ..): U partials   uw[s] = H[part s, :]^T @ X[part s]
                            ([R, D] fp32 tiles, SPLIT_W parts of the N rows)

    W_chunk's rows are w's own rows (through the index), X is x itself: no scaled copy of
    either is made (H carries a_i b_j; SCALE_B, float16: H does not, and the rows of W
    and X are scaled by b and a as they are loaded). Every output tile belongs to one
    program. FILTER:
    K steps over gradient tiles flagged zero by grad_kernel (flag [rows / FLAG_ROWS,
    FLAG_W], one per FLAG_ROWS x FLAG_COLS tile of H) are skipped."""
    pid = tl.program_id(0)
    acc_t: tl.constexpr = vx_ptr.dtype.element_ty
    R = C_chunk * K
    tn = tl.cdiv(D, BLOCK_N)
    dn = (pid % tn) * BLOCK_N + tl.arange(0, BLOCK_N)
    dmask = dn < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_t)
    if pid < TILES_X:
        rest = pid // tn
        tm = tl.cdiv(N, BLOCK_M)
        sx = rest // tm
        m = ((rest % tm) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = m < N
        per = tl.cdiv(tl.cdiv(R, SPLIT_X), BLOCK_K) * BLOCK_K
        k_lo = sx * per
        k_end = tl.minimum(k_lo + per, tl.cdiv(R, BLOCK_K) * BLOCK_K)
        fbase = flag_ptr + ((rest % tm) * BLOCK_M // FLAG_ROWS) * FLAG_W
        acc = _mm_tile(h_ptr, w_ptr, idx_ptr, b_ptr, m * ld_h, 1, stride_w, j_chunk * K,
                       dn, k_lo, k_end, R, mmask, dmask, acc, NUM_W_CLASSES, fbase,
                       FLAG_COLS, 1, False, True, K, HAS_INDEX, DOT_MODE, FP32_PREC, FILTER,
                       SCALE_B, BLOCK_K)
        out = vx_ptr + sx.to(tl.int64) * N * D + m[:, None] * D + dn[None, :]
        omask = mmask[:, None] & dmask[None, :]
        if FIRST == 0:
            acc += tl.load(out, mask=omask, other=0.0)
        tl.store(out, acc, mask=omask)
    else:
        q = pid - TILES_X
        rest = q // tn
        tr = tl.cdiv(R, BLOCK_M)
        sw = rest // tr
        r = (rest % tr) * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = r < R
        per = tl.cdiv(tl.cdiv(N, SPLIT_W), BLOCK_K) * BLOCK_K
        k_lo = sw * per
        k_end = tl.minimum(k_lo + per, N)
        fbase = flag_ptr + (rest % tr) * BLOCK_M // FLAG_COLS
        acc = _mm_tile(h_ptr, x_ptr, idx_ptr, a_ptr, r, ld_h, stride_x, 0, dn, k_lo, k_end,
                       N, rm, dmask, acc, NUM_W_CLASSES, fbase, FLAG_ROWS, FLAG_W, True,
                       False, K, HAS_INDEX, DOT_MODE, FP32_PREC, FILTER, SCALE_B, BLOCK_K)
        out = uw_ptr + sw.to(tl.int64) * R * D + r[:, None].to(tl.int64) * D + dn[None, :]
        tl.store(out, acc, mask=rm[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["rows", "row0", "NUM_W_CLASSES"])
def proj_rows_kernel(part_ptr, splits, src_ptr, stride_src, scale_ptr, idx_ptr, out_ptr,
                     stride_out, rows, row0, NUM_W_CLASSES, D,
                     K: tl.constexpr, HAS_INDEX: tl.constexpr, INDEXED_OUT: tl.constexpr,
                     NORMALIZE: tl.constexpr, POST_SCALE: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PASS: tl.constexpr):
    """The normalization backward of gradient rows from their split partials:

        V_r = sum_s part[s, r]                          (fp32 [rows, D] each)
        out_r = V_r - <v_r, V_r> scale_r^2 v_r          (NORMALIZE; else V_r)
              (times scale_r with POST_SCALE: H without its inverse norms)

    with v_r the source row: x_r for dx (scale = a), or row(row0 + r) of w for dw
    (scale = b, HAS_INDEX: through the Partial-FC index), since <v_r, V_r> = sum of
    G c over the row's logits. The output row is r of out (dx, or a chunk buffer for
    index_add_ when INDEXED_OUT) or w's own row in dw. ONE_PASS: the whole row
    (BLOCK_D >= D) stays in registers; else two passes over D."""
    pid = tl.program_id(0)
    r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = r < rows
    srow, ok = _shard_row_of_w(idx_ptr, row0 + r, rmask, K, NUM_W_CLASSES, HAS_INDEX)
    if INDEXED_OUT:
        orow = r
    else:
        orow = srow
    acc_t: tl.constexpr = part_ptr.dtype.element_ty
    if NORMALIZE:
        scale = tl.load(scale_ptr + row0 + r, mask=rmask, other=0.0).to(acc_t)
    else:
        scale = tl.zeros((BLOCK_R,), acc_t)
    if ONE_PASS:
        v, src, m2, dd = _summed_rows(part_ptr, splits, rows, r, src_ptr, srow, stride_src,
                                      ok, 0, D, NORMALIZE, BLOCK_R, BLOCK_D)
        if NORMALIZE:
            q = radial(tl.sum(src * v, axis=1) * scale * scale, scale)
            v = v - q[:, None] * src
        if POST_SCALE:
            v = v * scale[:, None]
        tl.store(out_ptr + orow[:, None] * stride_out + dd[None, :],
                 v.to(out_ptr.dtype.element_ty), mask=m2)
    else:
        q = tl.zeros((BLOCK_R,), acc_t)
        if NORMALIZE:
            for d0 in range(0, D, BLOCK_D):
                v, src, m2, dd = _summed_rows(part_ptr, splits, rows, r, src_ptr, srow,
                                              stride_src, ok, d0, D, NORMALIZE, BLOCK_R,
                                              BLOCK_D)
                q += tl.sum(src * v, axis=1)
            q = radial(q * scale * scale, scale)
        for d0 in range(0, D, BLOCK_D):
            v, src, m2, dd = _summed_rows(part_ptr, splits, rows, r, src_ptr, srow,
                                          stride_src, ok, d0, D, NORMALIZE, BLOCK_R, BLOCK_D)
            if NORMALIZE:
                v = v - q[:, None] * src
            if POST_SCALE:
                v = v * scale[:, None]
            tl.store(out_ptr + orow[:, None] * stride_out + dd[None, :],
                     v.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _summed_rows(part_ptr, splits, rows, r, src_ptr, srow, stride_src, ok, d0, D,
                 NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns [d0, d0 + BLOCK_D) of the rows r: the sum over the splits of the partials
    (fp32 [splits, rows, D]), the source rows (srow of src, in the partials' dtype;
    without NORMALIZE, unused: the sum again), the mask and the columns."""
    acc_t: tl.constexpr = part_ptr.dtype.element_ty
    dd = d0 + tl.arange(0, BLOCK_D)
    m2 = ok[:, None] & (dd < D)[None, :]
    v = tl.zeros((BLOCK_R, BLOCK_D), acc_t)
    for sp in range(0, splits):
        v += tl.load(part_ptr + (sp * rows + r)[:, None] * D + dd[None, :], mask=m2, other=0.0)
    if NORMALIZE:
        src = tl.load(src_ptr + srow[:, None] * stride_src + dd[None, :], mask=m2,
                      other=0.0).to(acc_t)
    else:
        src = v
    return v, src, m2, dd
