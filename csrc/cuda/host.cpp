// Host side of the CUDA backend (see host.h and arcface_cuda.cu for the design): checks,
// tiling, chunking, buffers and the order of the launches. Plain C++: compiled into every
// build, so that the dry run (dry_run.cpp) runs exactly this code.
#include "host.h"

#include <ATen/ATen.h>

#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <limits>

// mm / addmm with an out_dtype (a float32 result of 16-bit operands)
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define AK_MM_OUT_DTYPE 1
#else
#define AK_MM_OUT_DTYPE 0
#endif

namespace arcface::cuda {
namespace {

Params make_params(const Dims& dm, const Margin<float>& mp, int sms) {
  Params p;
  p.n = dm.n;
  p.d = dm.d;
  p.r = dm.r;
  p.k = dm.k;
  p.c = dm.c;
  p.mp = mp;
  p.ldg = 0;
  p.unsafe = nullptr;
  p.tc = std::max<int64_t>(1, TW / dm.k);
  p.ntiles = std::max<int64_t>(1, (dm.c + p.tc - 1) / p.tc);
  const int64_t row_tiles = (dm.n + BM - 1) / BM;
  // enough blocks for 4 waves over the SMs, never more splits than tiles
  int64_t want = (4LL * std::max(sms, 1) + row_tiles - 1) / std::max<int64_t>(row_tiles, 1);
  int64_t splits = std::min<int64_t>(std::max<int64_t>(want, 1), p.ntiles);
  splits = std::min<int64_t>(splits, 65535);
  p.tiles_per_split = (p.ntiles + splits - 1) / splits;
  return p;
}

int64_t num_splits(const Params& p) {
  return (p.ntiles + p.tiles_per_split - 1) / p.tiles_per_split;
}

void check_cuda_args(KernelRunner& run, const at::Tensor& x, const Dims& dm) {
  TORCH_CHECK(x.is_cuda(), "the CUDA kernel got tensors on ", x.device());
  const int cap = run.capability(x);
  TORCH_CHECK(cap >= 80, "the CUDA kernels of the cpp backend need compute capability 8.0 "
              "or newer (bfloat16 tensor cores, cp.async); ", x.device(), " has ", cap / 10,
              ".", cap % 10, ": use backend='triton' or 'chunked' there");
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "the CUDA kernel supports float32/float16/bfloat16, got float64 (use the "
              "chunked backend for float64 on CUDA)");
  TORCH_CHECK(dm.k <= MAX_K, "the CUDA kernel supports sub_centers <= ", MAX_K, ", got ",
              dm.k);
}

// Blocks of WARP_ROWS warps for the one-warp-per-row kernels.
Launch warp_rows(int64_t rows) {
  const int64_t blocks = (rows + WARP_ROWS - 1) / WARP_ROWS;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "too many rows for one launch: ",
              rows);
  return Launch{blocks, 1, WARP_ROWS * 32};
}

void inv_norms(KernelRunner& run, const at::Tensor& v, const at::Tensor* idx, int64_t rows,
               int64_t k, int64_t d, bool normalize, at::Tensor& out, at::Tensor& unsafe) {
  if (rows == 0) return;
  run.inv_norm(warp_rows(rows), v, idx, rows, k, d, normalize, out, &unsafe);
}

// Whether a call takes the fused tensor-core kernels (fused.cuh), and which: 16-bit
// inputs, K = 1, none of the optional terms, rows of 16-byte multiples at 16-byte aligned
// addresses (the 16-byte cp.async copies), shard classes below 2^31 (int class ids).
Fused fused_for(KernelRunner& run, const at::Tensor& x, const at::Tensor& w, const Dims& dm,
                bool terms) {
  const auto t = x.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16) return Fused::kNone;
  if (dm.k != 1 || terms || dm.d % 8 != 0 || dm.d == 0) return Fused::kNone;
  if (dm.c >= (int64_t(1) << 31) - 1 || dm.r >= (int64_t(1) << 31) - 1) return Fused::kNone;
  if (!run.aligned16(x) || !run.aligned16(w)) return Fused::kNone;
  return run.fused_kind(x);
}

// Whether the sm_90a kernels take their operand tiles by TMA: the rows of w contiguous (no
// index: a tile of gathered rows is no box of a tensor map), coordinates within TMA's
// int32 (the rows of w are, by fused_for).
bool fused_tma(Fused f, const at::Tensor* idx, const Dims& dm) {
  return f == Fused::kSm90 && idx == nullptr && dm.n < (int64_t(1) << 31) - 1 &&
         dm.d < (int64_t(1) << 31) - 1;
}

// The fused launch over classes [j_begin, j_end): grid (row tiles, splits) with splits
// chosen so that the CTAs fill `waves` rounds of the device's resident slots
// (FUSED_CTAS_PER_SM per SM), each split a run of whole class tiles.
Launch fused_launch(Fused f, int sms, int64_t n, int64_t j_begin, int64_t j_end,
                    int64_t waves, FusedParams& fp) {
  const int64_t bm = fused_bm(f), bn = fused_bn(f);
  const int64_t row_tiles = (n + bm - 1) / bm;
  fp.j_begin = j_begin;
  fp.j_end = j_end;
  fp.tiles = std::max<int64_t>(1, (j_end - j_begin + bn - 1) / bn);
  const int64_t slots = waves * FUSED_CTAS_PER_SM * std::max(sms, 1);
  int64_t splits = std::clamp<int64_t>(slots / row_tiles, 1, fp.tiles);
  splits = std::min<int64_t>(splits, 65535);
  fp.tiles_per_split = (fp.tiles + splits - 1) / splits;
  splits = (fp.tiles + fp.tiles_per_split - 1) / fp.tiles_per_split;
  return Launch{row_tiles, splits, fused_threads(f)};
}

// out (float32) = a b (+ out when accumulate), fp32 accumulation, whatever a and b's
// dtype: for 16-bit operands the dtype overloads of mm / addmm (torch >= 2.9: cuBLAS
// with a float32 result, no rounded intermediate), else the product in their dtype
// added in float32.
void gemm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == at::kFloat) {
    if (accumulate) out.addmm_(a, b);
    else at::mm_out(out, a, b);
    return;
  }
#if AK_MM_OUT_DTYPE
  if (!accumulate) {
    at::mm_out(out, a, b, at::kFloat);
    return;
  }
  // addmm with a float32 self and 16-bit operands: some torch releases accept only a self
  // of the operands' dtype; there (found once per process) the fp32 product is added
  static std::atomic<int> addmm_ok{1};
  if (addmm_ok.load()) {
    try {
      at::addmm_out(out, out, a, b, at::kFloat);
      return;
    } catch (const c10::Error&) {
      addmm_ok.store(0);
    }
  }
  out.add_(at::mm(a, b, at::kFloat));
#else
  if (accumulate) out.add_(at::mm(a, b));
  else out.copy_(at::mm(a, b));
#endif
}

// Classes per backward chunk: the block argument when given (classes per chunk, as the
// caller asked), else as many as fit the workspace bound (whole tiles of p.tc classes when
// there is more than one tile's worth).
int64_t bwd_chunk_classes(const Dims& dm, const Params& p, int64_t block, int64_t elem) {
  // the G workspace [N, rows] (elem) and the float32 dW chunk [rows, D] are each bounded
  const int64_t rows_cap =
      kWorkspaceBytes / std::max<int64_t>({elem * dm.n, int64_t(4) * dm.d, 1}) / 8 * 8;
  int64_t cc = std::max<int64_t>(1, rows_cap / dm.k);
  if (cc >= p.tc) cc -= cc % p.tc;
  if (cc >= 128) cc -= cc % 128;  // whole tiles of the fused kernels too
  if (block > 0) cc = block;
  return std::max<int64_t>(1, std::min(cc, dm.c));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_host(
    KernelRunner& run, const at::Tensor& x_in, const at::Tensor& w_in,
    const at::Tensor& labels_in, const std::optional<at::Tensor>& index_in,
    const std::optional<at::Tensor>& bias_in, double s, double m1, double m2, double m3,
    int64_t wrap_mode, int64_t grad_mode, bool normalize, int64_t sub_centers,
    double softcap, double interclass, double grad_filter, int64_t block) {
  Dims dm = check_fwd_args(x_in, w_in, labels_in, index_in, bias_in, s, m1, m2, m3,
                           wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass,
                           grad_filter, block);
  check_cuda_args(run, x_in, dm);
  check_values(labels_in, index_in, dm);
  const ContiguousInputs in = make_contiguous(x_in, w_in, labels_in, index_in, bias_in);
  const at::Tensor &x = in.x, &w = in.w, &labels = in.labels;
  const at::Tensor* idx = in.index.has_value() ? &*in.index : nullptr;
  const at::Tensor* bias = in.bias.has_value() ? &*in.bias : nullptr;
  auto fopt = x.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({dm.n}, fopt), target = at::zeros({dm.n}, fopt),
             sum_z = at::empty({dm.n}, fopt), max_z = at::empty({dm.n}, fopt),
             argmax = at::empty({dm.n}, x.options().dtype(at::kLong));
  if (dm.n == 0) return {lse, target, sum_z, max_z, argmax};
  auto mp = make_margin<float>(s, m1, m2, m3, wrap_mode, grad_mode, normalize, softcap,
                               interclass);
  Params p = make_params(dm, mp, run.num_sms(x));
  const bool terms = uses_terms(mp, bias != nullptr);  // which tile kernel instance
  const Fused fused = fused_for(run, x, w, dm, terms);
  FusedParams fp{dm.n, dm.d, 0, dm.c, 0, 0, 0, mp};
  fp.tma = fused_tma(fused, idx, dm);
  Launch fl{};
  if (fused != Fused::kNone) fl = fused_launch(fused, run.num_sms(x), dm.n, 0, dm.c, 1, fp);
  const int64_t splits = fused != Fused::kNone ? fl.grid_y : num_splits(p);
  at::Tensor anorm = at::empty({dm.n}, fopt),
             bnorm = at::empty({std::max<int64_t>(dm.c * dm.k, 1)}, fopt);
  at::Tensor part = at::empty({4, splits, dm.n}, fopt);
  at::Tensor part_a = at::empty({splits, dm.n}, x.options().dtype(at::kLong));
  // set by the inverse-norm kernels where a norm is above 2^63 (the tile kernels' fp32 dot
  // products could then overflow: they take their overflow-free path); read on the device
  at::Tensor unsafe = at::zeros({1}, x.options().dtype(at::kInt));
  inv_norms(run, x, nullptr, dm.n, 1, dm.d, normalize, anorm, unsafe);
  inv_norms(run, w, idx, dm.c * dm.k, dm.k, dm.d, normalize, bnorm, unsafe);
  if (dm.c > 0 && fused != Fused::kNone) {
    run.fused_fwd(fused, fl, x, w, labels, idx, anorm, bnorm, unsafe, fp, target, part,
                  part_a);
  } else if (dm.c > 0) {
    run.fwd(Launch{(dm.n + BM - 1) / BM, splits, THREADS}, x, w, labels, idx, terms, bias,
            anorm, bnorm, unsafe, p, target, part, part_a);
  } else {  // empty shard: lse = -inf, sums 0
    part[0].fill_(-std::numeric_limits<float>::infinity());
    part[1].zero_();
    part[2].zero_();
    part[3].fill_(-std::numeric_limits<float>::infinity());
    part_a.fill_(std::numeric_limits<int64_t>::max());
  }
  run.fwd_combine(Launch{(dm.n + COMBINE_THREADS - 1) / COMBINE_THREADS, 1, COMBINE_THREADS},
                  part, part_a, dm.n, splits, mp, bias != nullptr, lse, sum_z, max_z, argmax);
  return {lse, target, sum_z, max_z, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_host(
    KernelRunner& run, const at::Tensor& x_in, const at::Tensor& w_in,
    const at::Tensor& labels_in, const std::optional<at::Tensor>& index_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& lse_in,
    const at::Tensor& gp_in, const at::Tensor& gt_in, const at::Tensor& gs_in, double s,
    double m1, double m2, double m3, int64_t wrap_mode, int64_t grad_mode, bool normalize,
    int64_t sub_centers, double softcap, double interclass, double grad_filter,
    int64_t block) {
  Dims dm = check_bwd_args(x_in, w_in, labels_in, index_in, bias_in, lse_in, gp_in, gt_in,
                           gs_in, s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers,
                           softcap, interclass, grad_filter, block);
  check_cuda_args(run, x_in, dm);
  check_values(labels_in, index_in, dm);
  const ContiguousInputs in = make_contiguous(x_in, w_in, labels_in, index_in, bias_in);
  const at::Tensor &x = in.x, &w = in.w, &labels = in.labels;
  const std::optional<at::Tensor>& index = in.index;
  const at::Tensor* idx = index.has_value() ? &*index : nullptr;
  const at::Tensor* bias = in.bias.has_value() ? &*in.bias : nullptr;
  auto fopt = x.options().dtype(at::kFloat);
  // Rows of w outside the shard (index given) get 0; without an index every row of w is
  // a shard row and is written by its chunk.
  at::Tensor dx = at::empty({dm.n, dm.d}, x.options());
  at::Tensor dw = idx ? at::zeros({dm.r, dm.d}, w.options())
                      : at::empty({dm.r, dm.d}, w.options());
  // dbias: [R / K] in bias's dtype (zeros for classes outside the shard), or empty
  at::Tensor dbias = bias ? at::zeros({dm.r / dm.k}, bias->options())
                          : at::empty({0}, x.options());
  // no logits: every gradient is 0 (with D = 0 and a bias the logits are the bias terms)
  if (dm.n == 0 || dm.c == 0 || (dm.d == 0 && !bias)) {
    dx.zero_();
    dw.zero_();
    return {dx, dw, dbias};
  }
  auto vec = [&](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  at::Tensor lse = vec(lse_in), gp = vec(gp_in), gt = vec(gt_in), gs = vec(gs_in);
  auto mp = make_margin<float>(s, m1, m2, m3, wrap_mode, grad_mode, normalize, softcap,
                               interclass);
  Params p = make_params(dm, mp, run.num_sms(x));
  const bool terms = uses_terms(mp, bias != nullptr);  // which tile kernel instance
  const Fused fused = fused_for(run, x, w, dm, terms);
  const int64_t cc = bwd_chunk_classes(dm, p, block, x.element_size());
  const int64_t nr = cc * dm.k;  // rows of w per chunk
  // The fused G kernel writes G b (b_j: the inverse norm of class j's row) where that is
  // safe in the input dtype and the rows of w are contiguous: bfloat16 (float32's
  // exponent range: b is at most 1 / NORM_EPS), no index, normalizing. The products then
  // take w's own rows (no normalized copy W_hat, one rounding less in dX) and the chunk's
  // dW rows come out already scaled by b (dw_chunk_finish: prescaled). At the low end,
  // a product |G b| below 2^-126 becomes subnormal or 0: with norms up to 2^63 (the
  // tensor-core path) only terms with |G| < 2^-63, below the precision of the sums they
  // join; rows of w of norm far above that (2^100: the overflow-free path) lose more of
  // their smallest terms.
  const bool fold_b = fused != Fused::kNone && idx == nullptr && normalize &&
                      x.scalar_type() == at::kBFloat16;
  // The G workspace's leading dimension, a multiple of 8 elements (16 bytes) for every
  // chunk, the last included: aligned cuBLAS operands, the fused kernel's paired stores.
  const int64_t ldg = (nr + 7) / 8 * 8;
  p.ldg = ldg;
  at::Tensor anorm = at::empty({dm.n}, fopt), bnorm = at::empty({dm.c * dm.k}, fopt);
  // Per-chunk buffers (bounded): the G workspace and W_hat in the input dtype, the chunk's
  // G^T X_hat in float32 (finished, radial part removed, before any rounding), and with
  // an index its finished rows in w's dtype for index_add_.
  at::Tensor g_ws = at::empty({dm.n * ldg}, x.options());
  const bool need_wh = !fold_b && (normalize || idx);
  at::Tensor wh_ws = need_wh ? at::empty({nr, dm.d}, x.options()) : at::Tensor();
  at::Tensor dw_ws = at::empty({nr, dm.d}, fopt);
  at::Tensor dwt_ws = idx ? at::empty({nr, dm.d}, w.options()) : at::Tensor();
  // dX_acc = sum over chunks of G W_hat in float32: cuBLAS accumulates each chunk's
  // product into it (beta = 1), with no rounded copy of the product.
  at::Tensor dx_acc = at::zeros({dm.n, dm.d}, fopt);
  // With a bias: per chunk, the row tiles' partial sums of dL/dv [row tiles, CC] (fp32),
  // summed (at::sum, deterministic) into dbias_pos [C], one value per shard position.
  const int64_t row_tiles = (dm.n + BM - 1) / BM;
  at::Tensor dbias_part, dbias_pos;
  if (bias) {
    dbias_part = at::empty({row_tiles * cc}, fopt);
    dbias_pos = at::empty({dm.c}, fopt);
  }
  // Rows of w of the shard rows, for index_put_ (index given).
  at::Tensor shard_rows;
  if (idx) {
    shard_rows = (index->unsqueeze(1) * dm.k +
                  at::arange(dm.k, index->options()).unsqueeze(0)).reshape({-1});
  }
  // set by the inverse-norm kernels where a norm is above 2^63 (the tile kernels' fp32 dot
  // products could then overflow: they take their overflow-free path); read on the device
  at::Tensor unsafe = at::zeros({1}, x.options().dtype(at::kInt));
  inv_norms(run, x, nullptr, dm.n, 1, dm.d, normalize, anorm, unsafe);
  inv_norms(run, w, idx, dm.c * dm.k, dm.k, dm.d, normalize, bnorm, unsafe);
  // X_hat (x itself when not normalizing)
  at::Tensor xh = x;
  if (normalize) {
    xh = at::empty({dm.n, dm.d}, x.options());
    run.scaled_rows(warp_rows(dm.n), x, nullptr, 0, dm.n, 1, dm.d, anorm, xh);
  }
  const int sms = run.num_sms(x);
  for (int64_t j0 = 0; j0 < dm.c; j0 += cc) {
    const int64_t jn = std::min(cc, dm.c - j0), nrc = jn * dm.k, row0 = j0 * dm.k;
    // 1) G [N, nrc] (leading dimension ldg) into the workspace
    if (fused != Fused::kNone) {
      FusedParams fp{dm.n, dm.d, 0, 0, 0, 0, ldg, mp};
      fp.tma = fused_tma(fused, idx, dm);
      fp.fold_b = fold_b;
      const Launch fl = fused_launch(fused, sms, dm.n, j0, j0 + jn, 1, fp);
      run.fused_grad(fused, fl, x, w, labels, idx, anorm, bnorm, unsafe, lse, gp, gt, gs, fp,
                     g_ws);
    } else {
      const int64_t tiles = (jn + p.tc - 1) / p.tc;
      at::Tensor dbp;
      if (bias) dbp = dbias_part.narrow(0, 0, row_tiles * jn).view({row_tiles, jn});
      run.grad_chunk(Launch{row_tiles, std::min<int64_t>(tiles, 65535), THREADS}, x, w,
                     labels, idx, terms, bias, anorm, bnorm, unsafe, lse, gp, gt, gs, p, j0, jn,
                     g_ws, bias ? &dbp : nullptr);
      if (bias) {
        at::Tensor dst = dbias_pos.narrow(0, j0, jn);
        at::sum_out(dst, dbp, {0});
      }
    }
    // 2) W_hat of the chunk [nrc, D] (w's rows themselves when there is nothing to gather
    //    or scale, or when G carries the scale)
    at::Tensor wh;
    if (!need_wh) {
      wh = w.narrow(0, row0, nrc);
    } else {
      wh = wh_ws.narrow(0, 0, nrc);
      run.scaled_rows(warp_rows(nrc), w, idx, row0, nrc, dm.k, dm.d, bnorm, wh);
    }
    // 3) cuBLAS through ATen, fp32 accumulation and fp32 results (tensor cores for
    //    16-bit operands): dX_acc += G W_hat (with fold_b: (G b) W) straight into the
    //    fp32 accumulator (beta = 1, no rounded copy of the product), dW_c = G^T X_hat
    //    (with fold_b: b G^T X_hat) in fp32 (rounded once, after the radial projection of
    //    step 4). G is a strided view (leading dimension ldg).
    at::Tensor g = g_ws.narrow(0, 0, dm.n * ldg).view({dm.n, ldg}).narrow(1, 0, nrc);
    at::Tensor dwc = dw_ws.narrow(0, 0, nrc);
    gemm_f32(dx_acc, g, wh, /*accumulate=*/true);
    gemm_f32(dwc, g.t(), xh, /*accumulate=*/false);
    // 4) the chunk's rows of dw (normalization term in fp32), written or index_added
    if (idx) {
      at::Tensor rows = dwt_ws.narrow(0, 0, nrc);
      run.dw_chunk_finish(warp_rows(nrc), w, idx, bnorm, row0, nrc, dm.k, dm.d, normalize,
                          dwc, rows, false, fold_b);
      // accumulate through the index with index_put_ (sorted: deterministic also for a
      // class repeated in the index, where index_add_'s atomics are not)
      c10::List<std::optional<at::Tensor>> where;
      where.push_back(shard_rows.narrow(0, row0, nrc));
      dw.index_put_(where, rows, /*accumulate=*/true);
    } else {
      run.dw_chunk_finish(warp_rows(nrc), w, idx, bnorm, row0, nrc, dm.k, dm.d, normalize,
                          dwc, dw, true, fold_b);
    }
  }
  // 5) dx = a (dX_acc - r x_hat)
  run.dx_finish(warp_rows(dm.n), x, anorm, dx_acc, dm.n, dm.d, normalize, dx);
  // 6) dbias[g] = sum of its positions' sums: through the index with index_put_
  // (accumulate: sorted, deterministic, also for repeated classes)
  if (bias) {
    if (idx) {
      at::Tensor acc = at::zeros({dm.r / dm.k}, fopt);
      c10::List<std::optional<at::Tensor>> where;
      where.push_back(*index);
      acc.index_put_(where, dbias_pos, /*accumulate=*/true);
      dbias.copy_(acc);
    } else {
      dbias.copy_(dbias_pos);
    }
  }
  return {dx, dw, dbias};
}

}  // namespace arcface::cuda
