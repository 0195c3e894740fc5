// Host side of the CUDA backend (see host.h and arcface_cuda.cu for the design): checks,
// tiling, chunking, buffers and the order of the launches. Plain C++: compiled into every
// build, so that the dry run (dry_run.cpp) runs exactly this code.
#include "host.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

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

void check_cuda_args(const at::Tensor& x, const Dims& dm) {
  TORCH_CHECK(x.is_cuda(), "the CUDA kernel got tensors on ", x.device());
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
               int64_t k, int64_t d, bool normalize, at::Tensor& out) {
  if (rows == 0) return;
  run.inv_norm(warp_rows(rows), v, idx, rows, k, d, normalize, out);
}

// Classes per backward chunk: the block argument when given (classes per chunk, as the
// caller asked), else as many as fit the workspace bound (whole tiles of p.tc classes when
// there is more than one tile's worth).
int64_t bwd_chunk_classes(const Dims& dm, const Params& p, int64_t block, int64_t elem) {
  const int64_t rows_cap = kWorkspaceBytes / (elem * std::max<int64_t>({dm.n, dm.d, 1}));
  int64_t cc = std::max<int64_t>(1, rows_cap / dm.k);
  if (cc >= p.tc) cc -= cc % p.tc;
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
  check_cuda_args(x_in, dm);
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
  const int64_t splits = num_splits(p);
  at::Tensor anorm = at::empty({dm.n}, fopt),
             bnorm = at::empty({std::max<int64_t>(dm.c * dm.k, 1)}, fopt);
  at::Tensor part = at::empty({4, splits, dm.n}, fopt);
  at::Tensor part_a = at::empty({splits, dm.n}, x.options().dtype(at::kLong));
  inv_norms(run, x, nullptr, dm.n, 1, dm.d, normalize, anorm);
  inv_norms(run, w, idx, dm.c * dm.k, dm.k, dm.d, normalize, bnorm);
  if (dm.c > 0) {
    run.fwd(Launch{(dm.n + BM - 1) / BM, splits, THREADS}, x, w, labels, idx, terms, bias,
            anorm, bnorm, p, target, part, part_a);
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
  check_cuda_args(x_in, dm);
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
  const bool is_f32 = x.scalar_type() == at::kFloat;
  const int64_t cc = bwd_chunk_classes(dm, p, block, x.element_size());
  const int64_t nr = cc * dm.k;  // rows of w per chunk
  at::Tensor anorm = at::empty({dm.n}, fopt), bnorm = at::empty({dm.c * dm.k}, fopt);
  // Per-chunk buffers (bounded), in the input dtype: the G workspace, W_hat, dW.
  at::Tensor g_ws = at::empty({dm.n * nr}, x.options());
  at::Tensor wh_ws = at::empty({nr, dm.d}, x.options());
  at::Tensor dw_ws = at::empty({nr, dm.d}, x.options());
  // dX_acc = sum over chunks of G W_hat, in fp32; for 16-bit inputs each chunk's
  // product comes from cuBLAS in the input dtype (fp32 accumulation inside) and is added.
  at::Tensor dx_acc = at::zeros({dm.n, dm.d}, fopt);
  at::Tensor dx_part = is_f32 ? at::Tensor() : at::empty({dm.n, dm.d}, x.options());
  // With a bias: per chunk, the row tiles' partial sums of dL/dv [row tiles, CC] (fp32),
  // summed (at::sum, deterministic) into dbias_pos [C], one value per shard position.
  const int64_t row_tiles = (dm.n + BM - 1) / BM;
  at::Tensor dbias_part, dbias_pos;
  if (bias) {
    dbias_part = at::empty({row_tiles * cc}, fopt);
    dbias_pos = at::empty({dm.c}, fopt);
  }
  // Rows of w of the shard rows, for index_add (index given).
  at::Tensor shard_rows;
  if (idx) {
    shard_rows = (index->unsqueeze(1) * dm.k +
                  at::arange(dm.k, index->options()).unsqueeze(0)).reshape({-1});
  }
  inv_norms(run, x, nullptr, dm.n, 1, dm.d, normalize, anorm);
  inv_norms(run, w, idx, dm.c * dm.k, dm.k, dm.d, normalize, bnorm);
  // X_hat (x itself when not normalizing)
  at::Tensor xh = x;
  if (normalize) {
    xh = at::empty({dm.n, dm.d}, x.options());
    run.scaled_rows(warp_rows(dm.n), x, nullptr, 0, dm.n, 1, dm.d, anorm, xh);
  }
  for (int64_t j0 = 0; j0 < dm.c; j0 += cc) {
    const int64_t jn = std::min(cc, dm.c - j0), nrc = jn * dm.k, row0 = j0 * dm.k;
    // 1) G [N, nrc] into the workspace
    at::Tensor g = g_ws.narrow(0, 0, dm.n * nrc).view({dm.n, nrc});
    const int64_t tiles = (jn + p.tc - 1) / p.tc;
    at::Tensor dbp;
    if (bias) dbp = dbias_part.narrow(0, 0, row_tiles * jn).view({row_tiles, jn});
    run.grad_chunk(Launch{row_tiles, std::min<int64_t>(tiles, 65535), THREADS}, x, w, labels,
                   idx, terms, bias, anorm, bnorm, lse, gp, gt, gs, p, j0, jn, g,
                   bias ? &dbp : nullptr);
    if (bias) {
      at::Tensor dst = dbias_pos.narrow(0, j0, jn);
      at::sum_out(dst, dbp, {0});
    }
    // 2) W_hat of the chunk [nrc, D] (a view of w when there is nothing to gather/scale)
    at::Tensor wh;
    if (!normalize && !idx) {
      wh = w.narrow(0, row0, nrc);
    } else {
      wh = wh_ws.narrow(0, 0, nrc);
      run.scaled_rows(warp_rows(nrc), w, idx, row0, nrc, dm.k, dm.d, bnorm, wh);
    }
    // 3) dX_acc += G W_hat ; dW_chunk = G^T X_hat (cuBLAS; tensor cores for 16-bit)
    if (is_f32) {
      dx_acc.addmm_(g, wh);
    } else {
      at::mm_out(dx_part, g, wh);
      dx_acc.add_(dx_part);
    }
    at::Tensor dwc = dw_ws.narrow(0, 0, nrc);
    at::mm_out(dwc, g.t(), xh);
    // 4) the chunk's rows of dw (normalization term), written or index_added
    run.dw_chunk_finish(warp_rows(nrc), w, idx, bnorm, row0, nrc, dm.k, dm.d, normalize, dwc,
                        idx ? nullptr : &dw);
    if (idx) dw.index_add_(0, shard_rows.narrow(0, row0, nrc), dwc);
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
