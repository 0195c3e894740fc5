// Host side of the CUDA backend, written once and compiled into every build (no CUDA
// headers here): the argument checks, the tiling and chunking decisions, the buffers and
// the order of the kernel launches and cuBLAS / ATen calls of the forward and backward.
//
// The kernels themselves are reached through `KernelRunner`:
//   * CudaRunner (arcface_cuda.cu) launches them on the current CUDA stream;
//   * RecordingRunner (dry_run.cpp) only records each launch (grid, threads, sizes).
// The dry run executes this same host code on meta / fake tensors, so that the static
// kernel report (bench/static) sees exactly the allocations, ATen ops, host syncs and
// launches of a real call, without a GPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../arcface_math.h"
#include "../ops.h"

namespace arcface::cuda {

constexpr int BM = 64;         // rows of x per tile
constexpr int TW = 64;         // rows of w per tile
constexpr int THREADS = 128;   // threads of the tile kernels (4 warps)
constexpr int MAX_K = TW;      // sub-centers per class supported by one tile
constexpr int WARP_ROWS = 8;   // warps (one row each) per block of the row kernels
constexpr int COMBINE_THREADS = 256;

// The backward's per-chunk buffers (the G workspace [N, chunk rows], the chunk's W_hat /
// dW [chunk rows, D]) are each at most kWorkspaceBytes (ops.h) large by default.

// Sizes of one call, passed by value to the tile kernels.
struct Params {
  int64_t n, d, r, k, c;  // rows, features, rows of w, sub-centers, shard classes
  int64_t tc;             // classes per tile
  int64_t ntiles;         // class tiles
  int64_t tiles_per_split;
  int64_t ldg;            // backward: leading dimension of the G workspace (% 8 == 0)
  const int* unsafe;      // device flag of the inverse-norm kernels: a norm above 2^63
                          // (set by the runner from the `unsafe` tensor)
  Margin<float> mp;
};

// Whether a call uses any of the optional per-logit terms (a bias, softcap > 0,
// interclass > 0). The tile kernels come in two instances: without the terms (the
// common case), compiled to the work of a kernel that has none, and with them.
inline bool uses_terms(const Margin<float>& mp, bool has_bias) {
  return has_bias || mp.capped || mp.filter;
}

// The fused tensor-core kernels (fused.cuh), for float16 / bfloat16 with K = 1 and no
// bias / softcap / interclass filter: which generation's kernels a device runs.
enum class Fused { kNone = 0, kSm80 = 1, kSm90 = 2 };
// Their CTA tiles (rows of x, classes) and threads (fused.cuh / tiles.h check these).
constexpr int FUSED80_BM = 128, FUSED80_BN = 64, FUSED80_THREADS = 128;
constexpr int FUSED90_BM = 128, FUSED90_BN = 128, FUSED90_THREADS = 256;
constexpr int FUSED_CTAS_PER_SM = 2;  // both are sized for two resident CTAs per SM
// Their dynamic shared memory: 3 stages of the x and w tiles, 2 x BN column (norm, mask),
// and the TMA pipeline's 3 mbarriers (8 bytes each, the struct padded to 128 bytes).
constexpr int FUSED80_SMEM = 3 * (FUSED80_BM + FUSED80_BN) * 64 * 2 + 2 * FUSED80_BN * 8 + 128;
constexpr int FUSED90_SMEM = 3 * (FUSED90_BM + FUSED90_BN) * 64 * 2 + 2 * FUSED90_BN * 8 + 128;
inline int fused_bm(Fused f) { return f == Fused::kSm90 ? FUSED90_BM : FUSED80_BM; }
inline int fused_bn(Fused f) { return f == Fused::kSm90 ? FUSED90_BN : FUSED80_BN; }
inline int fused_threads(Fused f) {
  return f == Fused::kSm90 ? FUSED90_THREADS : FUSED80_THREADS;
}

// Sizes of one fused launch, by value (the kernels' argument).
struct FusedParams {
  int64_t n, d;             // rows of x, features (d % 8 == 0)
  int64_t j_begin, j_end;   // the classes (shard positions) of the launch
  int64_t tiles;            // class tiles of BN in [j_begin, j_end)
  int64_t tiles_per_split;  // class tiles per CTA (grid.y = ceil(tiles / tiles_per_split))
  int64_t ldg;              // backward: leading dimension of the G workspace (% 8 == 0)
  Margin<float> mp;
  // sm_90a: the operand tiles by TMA (the *_sm90_tma kernels; rows of w contiguous, no
  // index, rows of x and w below 2^31), else by cp.async
  bool tma = false;
  // backward: G is written as G_ij b_j (b_j the column's inverse norm), so that the
  // products take the raw rows of w (host.cpp bwd_host)
  bool fold_b = false;
};

// Grid (x, y) and threads per block of one launch.
struct Launch {
  int64_t grid_x, grid_y;
  int threads;
};

// The kernels of the backend (arcface_cuda.cu documents each). Tensors are passed whole;
// a runner takes their data pointers. `idx` is the Partial-FC index or nullptr.
class KernelRunner {
 public:
  virtual ~KernelRunner() = default;
  // Streaming multiprocessors of x's device (the forward splits its classes to fill them).
  virtual int num_sms(const at::Tensor& x) = 0;
  // Compute capability of x's device as 10 * major + minor (the kernels need >= 80).
  virtual int capability(const at::Tensor& x) = 0;
  // The fused kernels x's device runs: kSm90 on sm_90 when the build has sm_90a code,
  // kSm80 on any other device of capability >= 8.0, kNone below.
  virtual Fused fused_kind(const at::Tensor& x) = 0;
  // Whether t's data starts at a 16-byte boundary (the fused kernels' cp.async copies).
  virtual bool aligned16(const at::Tensor& t) = 0;
  // unsafe (int32 [1], or nullptr): set to 1 where a row's norm is above 2^63 (the raw
  // fp32 dot products of such a row may overflow: the tile kernels then take their
  // overflow-free path).
  virtual void inv_norm(const Launch& l, const at::Tensor& v, const at::Tensor* idx,
                        int64_t rows, int64_t k, int64_t d, bool normalize,
                        at::Tensor& out, at::Tensor* unsafe) = 0;
  // terms (uses_terms, decided once per call): launch the kernel instance with the
  // bias / softcap / interclass code, else the plain one (bias must then be nullptr).
  // bias: the per-class bias (w's dtype) or nullptr.
  virtual void fwd(const Launch& l, const at::Tensor& x, const at::Tensor& w,
                   const at::Tensor& labels, const at::Tensor* idx, bool terms,
                   const at::Tensor* bias,
                   const at::Tensor& anorm, const at::Tensor& bnorm,
                   const at::Tensor& unsafe, const Params& p,
                   at::Tensor& target, at::Tensor& part, at::Tensor& part_a) = 0;
  // The fused forward (kind != kNone): the partial states of every (split, row), as fwd.
  virtual void fused_fwd(Fused kind, const Launch& l, const at::Tensor& x, const at::Tensor& w,
                         const at::Tensor& labels, const at::Tensor* idx,
                         const at::Tensor& anorm, const at::Tensor& bnorm,
                         const at::Tensor& unsafe, const FusedParams& p, at::Tensor& target, at::Tensor& part,
                         at::Tensor& part_a) = 0;
  // The fused G kernel: G of the classes [p.j_begin, p.j_end) into g [N, p.ldg].
  virtual void fused_grad(Fused kind, const Launch& l, const at::Tensor& x,
                          const at::Tensor& w, const at::Tensor& labels,
                          const at::Tensor* idx, const at::Tensor& anorm,
                          const at::Tensor& bnorm, const at::Tensor& unsafe,
                          const at::Tensor& lse, const at::Tensor& gp, const at::Tensor& gt,
                          const at::Tensor& gs, const FusedParams& p, at::Tensor& g) = 0;
  // bias_key: the partial maxima are of s c + bias (with a bias), else of c.
  virtual void fwd_combine(const Launch& l, const at::Tensor& part, const at::Tensor& part_a,
                           int64_t n, int64_t splits, const Margin<float>& mp, bool bias_key,
                           at::Tensor& lse, at::Tensor& sum_z, at::Tensor& max_z,
                           at::Tensor& argmax) = 0;
  virtual void scaled_rows(const Launch& l, const at::Tensor& v, const at::Tensor* idx,
                           int64_t row0, int64_t rows, int64_t k, int64_t d,
                           const at::Tensor& scale, at::Tensor& out) = 0;
  // terms: as for fwd. dbias_part (with a bias, else nullptr): [row tiles, jn] fp32, each
  // row tile's sum of dL/dv over its rows, per class of the chunk.
  virtual void grad_chunk(const Launch& l, const at::Tensor& x, const at::Tensor& w,
                          const at::Tensor& labels, const at::Tensor* idx, bool terms,
                          const at::Tensor* bias, const at::Tensor& anorm,
                          const at::Tensor& bnorm, const at::Tensor& unsafe,
                          const at::Tensor& lse,
                          const at::Tensor& gp, const at::Tensor& gt, const at::Tensor& gs,
                          const Params& p, int64_t j0, int64_t jn, at::Tensor& g,
                          at::Tensor* dbias_part) = 0;
  // dwc: the chunk's G^T X_hat [rows, D] in float32 (prescaled: (G b)^T X_hat, G having
  // been written with the columns' inverse norms); the finished rows go to dw itself
  // (out = dw, direct: no index) or to out's first rows (out = a [rows, D] buffer of w's
  // dtype, for index_add_).
  virtual void dw_chunk_finish(const Launch& l, const at::Tensor& w, const at::Tensor* idx,
                               const at::Tensor& bnorm, int64_t row0, int64_t rows,
                               int64_t k, int64_t d, bool normalize, const at::Tensor& dwc,
                               at::Tensor& out, bool direct, bool prescaled) = 0;
  virtual void dx_finish(const Launch& l, const at::Tensor& x, const at::Tensor& anorm,
                         const at::Tensor& dx_acc, int64_t n, int64_t d, bool normalize,
                         at::Tensor& dx) = 0;
};

// The forward / backward primitive (schemas in ops.cpp) on x's device through `run`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_host(
    KernelRunner& run, const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bias, double s,
    double m1, double m2, double m3, int64_t wrap_mode, int64_t grad_mode, bool normalize,
    int64_t sub_centers, double softcap, double interclass, double grad_filter,
    int64_t block);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_host(
    KernelRunner& run, const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& g_p, const at::Tensor& g_t,
    const at::Tensor& g_s, double s, double m1, double m2, double m3, int64_t wrap_mode,
    int64_t grad_mode, bool normalize, int64_t sub_centers, double softcap,
    double interclass, double grad_filter, int64_t block);

}  // namespace arcface::cuda
