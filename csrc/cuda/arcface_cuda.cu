// CUDA kernel of the forward / backward primitive (shared/design.md section 3).
//
// Tiles of BM = 64 rows x TW = 64 rows of w (TC = TW / K classes).
//   * Logits: S = x_tile . w_tile^T on tensor cores for float16 / bfloat16 (WMMA
//     16x16x16, fp32 accumulation), fp32 FMA for float32; then scaled by the inverse
//     norms a_i b_j in the epilogue (no normalized copy of x or w is made).
//   * Forward: the grid is (row tiles, class splits); two threads per row keep an online
//     log-sum-exp over the split's classes; the splits' partial states are merged by a
//     second kernel (lse_merge).
//   * Backward, bounded workspace: the classes are walked in chunks of CC classes
//     (CC*K rows of w; CC chosen so that the G workspace [N, CC*K] and the chunk's
//     [CC*K, D] buffers are each <= kWorkspaceBytes = 16 MiB, whatever C is; a smaller
//     `block` op argument, a tuning hint, lowers CC). Per chunk:
//       1. grad_chunk_kernel recomputes the chunk's logits tile by tile with the forward's
//          code (tile_columns / tile_dots / class_cosine) and writes
//          G_ij = dL/dc_ij (arcface_math.h grad_target / grad_nontarget: psi' at the
//          target; for sub-centers at the arg-max row, 0 at the others) into the
//          workspace in the input dtype (fp32 for fp32);
//       2. W_hat = b w of the chunk's rows (gathered through the Partial FC index);
//       3. cuBLAS (at::mm / addmm_: tensor cores for 16-bit, fp32 accumulation):
//          dX_acc += G W_hat (fp32 [N, D]; for 16-bit the chunk's product comes back in
//          the input dtype and is added in fp32), dW_chunk = G^T X_hat;
//       4. dw rows = b (dW_chunk - q b w) with q_j = <w_hat_j, dW_chunk_j> (= sum_i G_ij
//          c_ij), fp32, written to their rows of w (index_add_ through the index: a
//          class may repeat).
//     Finally dx = a (dX_acc - r a x) with r_i = <x_hat_i, dX_acc_i> (= sum_j G_ij c_ij).
//     Using these identities for r and q instead of sums of G c removes exactly the
//     radial part of the products actually computed (as autograd through F.normalize
//     does); they differ from sum G c only where a cosine is clamped at +-1.
//     No atomics (index_add_ aside, for repeated classes): deterministic.
//
// Why (N = 8192, C = 1M = 2^20, D = 512, bf16, on an H200: ~790 TFLOP/s bf16 dense,
// ~4.3 TB/s): the whole step is 8 N C D = 3.5e16 FLOPs (forward logits 2NCD, backward
// recompute 2NCD, G W 2NCD, G^T X 2NCD), 44 ms at peak. The previous backward did the
// two gradient products (4NCD = 1.8e16 of the 8) with fp32 FMA from shared memory (at
// most ~67 TFLOP/s on an H100/H200, i.e. over 260 ms) and fp32 atomics into [N, D] and
// [C, D] accumulators; here they run in cuBLAS on tensor cores. Bytes the design adds:
// G is written once and read by the two GEMMs, 3 * 2 B * N C = 52 GB (12 ms); with a
// 16 MiB workspace a chunk is 1024 rows of w (1024 chunks), each reading and writing
// dX_acc (fp32, 16 MiB) and the chunk's bf16 product (8 MiB), 48 MiB per chunk = 50 GB
// (12 ms); gathering W_hat and writing dw are ~4 GB. So ~110 GB against 2.6e16
// backward FLOPs: 240 FLOP/B, above the H200's ridge (~184 FLOP/B), i.e. compute bound
// at peak rates, though not by much: the G round trip and the dX_acc traffic each cost
// about a third of the GEMM time, and a larger workspace (fewer chunks) cuts the dX_acc
// part proportionally. The recompute kernel (simple 64 x 64 WMMA tiles, no pipelining)
// is the least efficient part.
//
// Precision: the GEMM operands X_hat, W_hat are O(1) and G is O(s * |psi'| * g); in
// float16 a G above 65504 (a target at c ~ 1 in exact-gradient mode, psi' ~ 1/sin(theta),
// with a large dL/dloss) becomes inf, where float32 / bfloat16 keep it.
//
// Nothing of size N x C exists: memory beyond inputs and outputs is O(N + C) vectors,
// X_hat and dX_acc [N, D], and the chunk buffers. All offsets are 64-bit. The
// per-element math is csrc/arcface_math.h, shared with the CPU kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../arcface_math.h"
#include "../ops.h"

namespace arcface {
namespace {

constexpr int BM = 64;        // rows of x per tile
constexpr int TW = 64;        // rows of w per tile
constexpr int BK = 32;        // features per step of the tile product
constexpr int LDF = TW + 4;   // leading dimension of float tiles (multiple of 4 for WMMA)
constexpr int LDH = BK + 8;   // leading dimension of 16-bit tiles (multiple of 8)
constexpr int LDK = BK + 1;   // leading dimension of float operand tiles (FMA path)
constexpr int THREADS = 128;  // 4 warps
constexpr int MAX_K = TW;     // sub-centers per class supported by one tile

// c10 types -> CUDA's native 16-bit types (same bits).
template <typename T>
struct Native {
  using type = T;
};
template <>
struct Native<c10::Half> {
  using type = __half;
};
template <>
struct Native<c10::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Row of w of shard position p (class p / K, sub-center p % K).
__device__ __forceinline__ int64_t w_row(const int64_t* idx, int64_t p, int64_t K) {
  return (idx ? idx[p / K] : p / K) * K + p % K;
}

struct Params {
  int64_t n, d, r, k, c;  // rows, features, rows of w, sub-centers, shard classes
  int64_t tc;             // classes per tile
  int64_t ntiles;         // class tiles
  int64_t tiles_per_split;
  Margin<float> mp;
};

// Shared memory of one block: the tile of dot products (G in place in the backward),
// and a union of the operand tiles of the logits product (16-bit or float).
template <typename T>
struct Smem {
  float s[BM][LDF];
  union {
    struct {
      T x[BM][LDH];
      T w[TW][LDH];
    } h;
    struct {
      float x[BM][LDK];
      float w[TW][LDK];
    } f;
  } u;
  int64_t wrow[TW];  // rows of w of the tile's columns (-1: past the class range)
  float b[TW];       // their inverse norms
};

// 1 / max(|v_row|, eps) for the rows of x (idx == nullptr, K == 1: identity map) or the
// shard's rows of w; one warp per row.
template <typename T>
__global__ void inv_norm_kernel(const T* __restrict__ v, const int64_t* __restrict__ idx,
                                int64_t rows, int64_t k, int64_t d, bool normalize,
                                float* __restrict__ out) {
  int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* src = v + w_row(idx, row, k) * d;
  float ss = 0.f;
  for (int64_t t = lane; t < d; t += 32) {
    float e = to_f(src[t]);
    ss += e * e;
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) out[row] = normalize ? inv_norm(ss) : 1.f;
}

// S[i][t] = <x_{r0+i}, w_{wrow[t]}> for the block's tile (raw dot products, fp32).
// Tensor cores for 16-bit types.
template <typename T>
__device__ void tile_dots(const T* __restrict__ x, const T* __restrict__ w, int64_t r0,
                          const Params& p, Smem<T>& sm) {
  const int tid = threadIdx.x;
  if constexpr (std::is_same_v<T, float>) {
    // 128 threads x (8 rows x 4 columns)
    const int ty = tid / 16, tx = tid % 16;
    float acc[8][4];
#pragma unroll
    for (int a = 0; a < 8; ++a)
#pragma unroll
      for (int b2 = 0; b2 < 4; ++b2) acc[a][b2] = 0.f;
    for (int64_t k0 = 0; k0 < p.d; k0 += BK) {
      for (int e = tid; e < BM * BK; e += THREADS) {
        int i = e / BK, kk = e % BK;
        int64_t gi = r0 + i, gk = k0 + kk;
        sm.u.f.x[i][kk] = (gi < p.n && gk < p.d) ? x[gi * p.d + gk] : 0.f;
        int64_t wr = sm.wrow[i];
        sm.u.f.w[i][kk] = (wr >= 0 && gk < p.d) ? w[wr * p.d + gk] : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        float xv[8], wv[4];
#pragma unroll
        for (int a = 0; a < 8; ++a) xv[a] = sm.u.f.x[ty * 8 + a][kk];
#pragma unroll
        for (int b2 = 0; b2 < 4; ++b2) wv[b2] = sm.u.f.w[tx + 16 * b2][kk];
#pragma unroll
        for (int a = 0; a < 8; ++a)
#pragma unroll
          for (int b2 = 0; b2 < 4; ++b2) acc[a][b2] = fmaf(xv[a], wv[b2], acc[a][b2]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 8; ++a)
#pragma unroll
      for (int b2 = 0; b2 < 4; ++b2) sm.s[ty * 8 + a][tx + 16 * b2] = acc[a][b2];
  } else {
    using namespace nvcuda;
    const int warp = tid / 32;  // rows 16*warp .. +15, all 64 columns
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[TW / 16];
#pragma unroll
    for (int f = 0; f < TW / 16; ++f) wmma::fill_fragment(acc[f], 0.f);
    const T zero = from_f<T>(0.f);
    for (int64_t k0 = 0; k0 < p.d; k0 += BK) {
      for (int e = tid; e < BM * BK; e += THREADS) {
        int i = e / BK, kk = e % BK;
        int64_t gi = r0 + i, gk = k0 + kk;
        sm.u.h.x[i][kk] = (gi < p.n && gk < p.d) ? x[gi * p.d + gk] : zero;
        int64_t wr = sm.wrow[i];
        sm.u.h.w[i][kk] = (wr >= 0 && gk < p.d) ? w[wr * p.d + gk] : zero;
      }
      __syncthreads();
#pragma unroll
      for (int ks = 0; ks < BK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sm.u.h.x[warp * 16][ks], LDH);
#pragma unroll
        for (int f = 0; f < TW / 16; ++f) {
          // B[k][n] = w[n][k]: the w tile read as column-major
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, &sm.u.h.w[f * 16][ks], LDH);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < TW / 16; ++f)
      wmma::store_matrix_sync(&sm.s[warp * 16][f * 16], acc[f], LDF, wmma::mem_row_major);
  }
  __syncthreads();
}

// The columns of the tile whose first shard class is j0 (classes j0 .. min(j0 + tc,
// j_end) - 1): rows of w and their inverse norms.
template <typename T>
__device__ void tile_columns(const int64_t* __restrict__ idx, const float* __restrict__ bnorm,
                             int64_t j0, int64_t j_end, const Params& p, Smem<T>& sm) {
  for (int t = threadIdx.x; t < TW; t += THREADS) {
    int64_t j = j0 + t / p.k;  // shard class of column t
    bool ok = t < p.tc * p.k && j < j_end;
    int64_t pos = j * p.k + t % p.k;  // shard row
    sm.wrow[t] = ok ? w_row(idx, pos, p.k) : -1;
    sm.b[t] = ok ? bnorm[pos] : 0.f;
  }
  __syncthreads();
}

// Class cosine of tile row i, class jj (max over its sub-centers) and the arg-max column.
template <typename T>
__device__ __forceinline__ float class_cosine(const Smem<T>& sm, int i, int jj, float ai,
                                              const Params& p, int* col) {
  int t0 = jj * (int)p.k;
  float best = cosine(sm.s[i][t0] * ai * sm.b[t0], p.mp.normalize);
  int bc = t0;
  for (int kk = 1; kk < p.k; ++kk) {
    float v = cosine(sm.s[i][t0 + kk] * ai * sm.b[t0 + kk], p.mp.normalize);
    if (better_max(v, (int64_t)kk, best, (int64_t)(bc - t0))) {
      best = v;
      bc = t0 + kk;
    }
  }
  *col = bc;
  return best;
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
    fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const int64_t* __restrict__ lab,
               const int64_t* __restrict__ idx, const float* __restrict__ anorm,
               const float* __restrict__ bnorm, Params p, float* __restrict__ target,
               float* __restrict__ part_m, float* __restrict__ part_s,
               float* __restrict__ part_z, float* __restrict__ part_b,
               int64_t* __restrict__ part_a) {
  __shared__ __align__(32) Smem<T> sm;
  const int64_t r0 = (int64_t)blockIdx.x * BM;
  const int64_t split = blockIdx.y;
  const int i = threadIdx.x / 2, h = threadIdx.x % 2;
  const int64_t gi = r0 + i;
  const bool row_ok = gi < p.n;
  const float ai = row_ok ? anorm[gi] : 0.f;
  const int64_t li = row_ok ? lab[gi] : -1;
  float m = -INFINITY, se = 0.f, sz = 0.f, best = -INFINITY;
  int64_t barg = std::numeric_limits<int64_t>::max();
  const int64_t t_begin = split * p.tiles_per_split;
  const int64_t t_end = min(p.ntiles, t_begin + p.tiles_per_split);
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    tile_columns(idx, bnorm, tile * p.tc, p.c, p, sm);
    tile_dots(x, w, r0, p, sm);
    const int64_t j0 = tile * p.tc;
    const int tc = (int)min(p.tc, p.c - j0);
    if (row_ok) {
      for (int jj = h; jj < tc; jj += 2) {
        int col;
        const float c = class_cosine(sm, i, jj, ai, p, &col);
        const int64_t j = j0 + jj;
        if (better_max(c, j, best, barg)) {
          best = c;
          barg = j;
        }
        float z = p.mp.s * c;
        if (j == li) {
          z = p.mp.s * psi(c, p.mp);
          target[gi] = z;  // the only thread that holds (i, label_i)
        }
        sz += z;
        if (z > m || z != z) {  // a NaN logit makes the state NaN (m = NaN), as on the CPU
          se = se * ak_exp(m - z) + 1.f;
          m = z;
        } else {
          se += ak_exp(z - m);
        }
      }
    }
    __syncthreads();
  }
  // merge the two threads of the row, then write the split's partial state
  const float om = __shfl_xor_sync(0xffffffffu, m, 1);
  const float os = __shfl_xor_sync(0xffffffffu, se, 1);
  const float oz = __shfl_xor_sync(0xffffffffu, sz, 1);
  const float ob = __shfl_xor_sync(0xffffffffu, best, 1);
  const int64_t oa = __shfl_xor_sync(0xffffffffu, (long long)barg, 1);
  if (h == 0 && row_ok) {
    const Lse<float> l = lse_merge(Lse<float>{m, se}, Lse<float>{om, os});
    // better_max keeps a NaN; with NaN on both threads take the first class (CPU rule)
    if (better_max(ob, oa, best, barg) || (ob != ob && best != best && oa < barg)) {
      best = ob;
      barg = oa;
    }
    const int64_t o = split * p.n + gi;
    part_m[o] = l.m;
    part_s[o] = l.sum;
    part_z[o] = sz + oz;
    part_b[o] = best;
    part_a[o] = barg;
  }
}

__global__ void fwd_combine_kernel(const float* __restrict__ part_m,
                                   const float* __restrict__ part_s,
                                   const float* __restrict__ part_z,
                                   const float* __restrict__ part_b,
                                   const int64_t* __restrict__ part_a, int64_t n,
                                   int64_t splits, float s, float* __restrict__ lse,
                                   float* __restrict__ sum_z, float* __restrict__ max_z,
                                   int64_t* __restrict__ argmax) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  Lse<float> l = lse_empty<float>();
  float z = 0.f, best = -INFINITY;
  int64_t arg = std::numeric_limits<int64_t>::max();
  for (int64_t sp = 0; sp < splits; ++sp) {
    const int64_t o = sp * n + i;
    l = lse_merge(l, Lse<float>{part_m[o], part_s[o]});
    z += part_z[o];
    if (better_max(part_b[o], part_a[o], best, arg)) {
      best = part_b[o];
      arg = part_a[o];
    }
  }
  lse[i] = lse_value(l);
  sum_z[i] = z;
  max_z[i] = s * best;
  argmax[i] = arg == std::numeric_limits<int64_t>::max() ? 0 : arg;
}

// ----------------------------------------------------------------------------- backward
// G = dL/dc for the rows of x and the classes [j0, j0 + jn) of one chunk, written to the
// workspace g_out [N, jn*K] (row-major, leading dimension jn*K) in the input dtype (fp32
// for fp32): the logits are recomputed tile by tile as in the forward (tile_columns,
// tile_dots, class_cosine), G replaces them in shared memory (at the arg-max sub-center
// of each class, 0 at its other sub-centers) and the tile is stored row by row. The
// grid is (row tiles, tiles of the chunk, strided when there are more than 65535).
template <typename T>
__global__ void __launch_bounds__(THREADS)
    grad_chunk_kernel(const T* __restrict__ x, const T* __restrict__ w,
                      const int64_t* __restrict__ lab, const int64_t* __restrict__ idx,
                      const float* __restrict__ anorm, const float* __restrict__ bnorm,
                      const float* __restrict__ lse, const float* __restrict__ gp,
                      const float* __restrict__ gt, const float* __restrict__ gs, Params p,
                      int64_t j0, int64_t jn, T* __restrict__ g_out) {
  __shared__ __align__(32) Smem<T> sm;
  const int64_t r0 = (int64_t)blockIdx.x * BM;
  const int tid = threadIdx.x;
  const int i = tid / 2, h = tid % 2;  // two threads per tile row, classes interleaved
  const int64_t gi = r0 + i;
  const bool row_ok = gi < p.n;
  const float ai = row_ok ? anorm[gi] : 0.f;
  const int64_t li = row_ok ? lab[gi] : -1;
  const float lsei = row_ok ? lse[gi] : 0.f, gpi = row_ok ? gp[gi] : 0.f;
  const float gti = row_ok ? gt[gi] : 0.f, gsi = row_ok ? gs[gi] : 0.f;
  const int64_t ld = jn * p.k;
  const int64_t j_end = j0 + jn;
  const int64_t ntiles = (jn + p.tc - 1) / p.tc;
  for (int64_t tl = blockIdx.y; tl < ntiles; tl += gridDim.y) {
    const int64_t jt = j0 + tl * p.tc;  // first class of the tile
    tile_columns(idx, bnorm, jt, j_end, p, sm);
    tile_dots(x, w, r0, p, sm);
    const int tc = (int)min(p.tc, j_end - jt);
    if (row_ok) {
      // class jj's K columns are read and written by this thread only: G goes in place
      for (int jj = h; jj < tc; jj += 2) {
        int col;
        const float c = class_cosine(sm, i, jj, ai, p, &col);
        const float g = (jt + jj == li) ? grad_target(c, lsei, gpi, gti, gsi, p.mp)
                                        : grad_nontarget(p.mp.s * c, lsei, gpi, gsi, p.mp.s);
        const int t0 = jj * (int)p.k;
        for (int kk = 0; kk < (int)p.k; ++kk) sm.s[i][t0 + kk] = (t0 + kk == col) ? g : 0.f;
      }
    }
    __syncthreads();
    const int cols = tc * (int)p.k;
    const int64_t c0 = (jt - j0) * p.k;  // workspace column of the tile's column 0
    for (int e = tid; e < BM * TW; e += THREADS) {
      const int ii = e / TW, t = e % TW;
      const int64_t row = r0 + ii;
      if (row < p.n && t < cols) g_out[row * ld + c0 + t] = from_f<T>(sm.s[ii][t]);
    }
    __syncthreads();  // the tile is stored before the next one overwrites it
  }
}

// out[rr] = v[w_row(idx, row0 + rr, k)] * scale[row0 + rr] (rr < rows) in T: the
// normalized rows x_hat (idx = nullptr, k = 1, row0 = 0) or a chunk's normalized rows of w
// (through the Partial FC index when given); one warp per row.
template <typename T>
__global__ void scaled_rows_kernel(const T* __restrict__ v, const int64_t* __restrict__ idx,
                                   int64_t row0, int64_t rows, int64_t k, int64_t d,
                                   const float* __restrict__ scale, T* __restrict__ out) {
  const int64_t rr = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (rr >= rows) return;
  const T* src = v + w_row(idx, row0 + rr, k) * d;
  const float sc = scale[row0 + rr];
  T* dst = out + rr * d;
  for (int64_t t = lane; t < d; t += 32) dst[t] = from_f<T>(to_f(src[t]) * sc);
}

// The chunk's rows of dw from u = dwc [rows, D] = G^T x_hat (shard rows row0 ..
// row0 + rows - 1): with w_hat = b w in fp32, q = <w_hat, u> (= sum_i G_ij c_ij) and
// dw = norm_grad(u, q, w_hat, b) (normalize) or u. Written to dw's row when dw_direct is
// given (no index: each row of w belongs to one shard row), else in place into dwc (the
// caller index_adds it: a class may repeat in the index). One warp per row; dwc and the
// destination may alias (each element is read, then written, by one lane).
template <typename T>
__global__ void dw_chunk_finish_kernel(const T* __restrict__ w,
                                       const int64_t* __restrict__ idx,
                                       const float* __restrict__ bnorm, int64_t row0,
                                       int64_t rows, int64_t k, int64_t d, bool normalize,
                                       T* dwc, T* dw_direct) {
  const int64_t rr = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (rr >= rows) return;
  const int64_t wr = w_row(idx, row0 + rr, k);
  const T* src = w + wr * d;
  const float b = bnorm[row0 + rr];
  T* u = dwc + rr * d;
  T* dst = dw_direct ? dw_direct + wr * d : u;
  float q = 0.f;
  if (normalize) {
    for (int64_t t = lane; t < d; t += 32) q += b * to_f(src[t]) * to_f(u[t]);
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
  }
  for (int64_t t = lane; t < d; t += 32) {
    float v = to_f(u[t]);
    if (normalize) v = norm_grad(v, q, b * to_f(src[t]), b);
    dst[t] = from_f<T>(v);
  }
}

// dx from u = dx_acc [N, D] = G W_hat (fp32): with x_hat = a x in fp32, r = <x_hat, u>
// (= sum_j G_ij c_ij) and dx = norm_grad(u, r, x_hat, a) (normalize) or u, in the input
// dtype. One warp per row.
template <typename T>
__global__ void dx_finish_kernel(const T* __restrict__ x, const float* __restrict__ anorm,
                                 const float* __restrict__ dx_acc, int64_t n, int64_t d,
                                 bool normalize, T* __restrict__ dx) {
  const int64_t i = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  const T* src = x + i * d;
  const float* u = dx_acc + i * d;
  const float a = anorm[i];
  float r = 0.f;
  if (normalize) {
    for (int64_t t = lane; t < d; t += 32) r += a * to_f(src[t]) * u[t];
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  }
  for (int64_t t = lane; t < d; t += 32) {
    float v = u[t];
    if (normalize) v = norm_grad(v, r, a * to_f(src[t]), a);
    dx[i * d + t] = from_f<T>(v);
  }
}

// float32 / float16 / bfloat16 (the CUDA kernel has no float64 path).
#define AK_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

int num_sms(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

Params make_params(const Dims& dm, const Margin<float>& mp, int device) {
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
  int64_t want = (4LL * num_sms(device) + row_tiles - 1) / std::max<int64_t>(row_tiles, 1);
  int64_t splits = std::min<int64_t>(std::max<int64_t>(want, 1), p.ntiles);
  splits = std::min<int64_t>(splits, 65535);
  p.tiles_per_split = (p.ntiles + splits - 1) / splits;
  return p;
}

int64_t num_splits(const Params& p) { return (p.ntiles + p.tiles_per_split - 1) / p.tiles_per_split; }

void check_cuda_args(const at::Tensor& x, const Dims& dm) {
  TORCH_CHECK(x.is_cuda(), "the CUDA kernel got tensors on ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "the CUDA kernel supports float32/float16/bfloat16, got float64 (use the "
              "chunked backend for float64 on CUDA)");
  TORCH_CHECK(dm.k <= MAX_K, "the CUDA kernel supports sub_centers <= ", MAX_K, ", got ",
              dm.k);
}

template <typename c10_t>
void launch_inv_norms(const at::Tensor& v, const int64_t* idx, int64_t rows, int64_t k,
                      int64_t d, bool normalize, at::Tensor& out, cudaStream_t stream) {
  using T = typename Native<c10_t>::type;
  if (rows == 0) return;
  const int warps = 8;
  const int64_t blocks = (rows + warps - 1) / warps;
  inv_norm_kernel<T><<<(unsigned)blocks, warps * 32, 0, stream>>>(
      reinterpret_cast<const T*>(v.data_ptr<c10_t>()), idx, rows, k, d, normalize,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpp_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& index_in, double s, double m1, double m2, double m3,
    int64_t wrap_mode, int64_t grad_mode, bool normalize, int64_t sub_centers,
    int64_t block) {
  Dims dm = check_fwd_args(x_in, w_in, labels_in, index_in, s, m1, m2, m3, wrap_mode,
                           grad_mode, normalize, sub_centers, block);
  check_cuda_args(x_in, dm);
  c10::cuda::CUDAGuard guard(x_in.device());
  check_values(labels_in, index_in, dm);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const ContiguousInputs in = make_contiguous(x_in, w_in, labels_in, index_in);
  const at::Tensor &x = in.x, &w = in.w, &labels = in.labels;
  const int64_t* idx = in.idx();
  auto fopt = x.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({dm.n}, fopt), target = at::zeros({dm.n}, fopt),
             sum_z = at::empty({dm.n}, fopt), max_z = at::empty({dm.n}, fopt),
             argmax = at::empty({dm.n}, x.options().dtype(at::kLong));
  if (dm.n == 0) return {lse, target, sum_z, max_z, argmax};
  auto mp = make_margin<float>(s, m1, m2, m3, wrap_mode, grad_mode, normalize);
  Params p = make_params(dm, mp, x.get_device());
  const int64_t splits = num_splits(p);
  at::Tensor anorm = at::empty({dm.n}, fopt), bnorm = at::empty({std::max<int64_t>(dm.c * dm.k, 1)}, fopt);
  at::Tensor part = at::empty({4, splits, dm.n}, fopt);
  at::Tensor part_a = at::empty({splits, dm.n}, x.options().dtype(at::kLong));
  AK_DISPATCH_CUDA_TYPES(x.scalar_type(), "cpp_fwd_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    launch_inv_norms<scalar_t>(x, nullptr, dm.n, 1, dm.d, normalize, anorm, stream);
    launch_inv_norms<scalar_t>(w, idx, dm.c * dm.k, dm.k, dm.d, normalize, bnorm, stream);
    {
      dim3 grid((unsigned)((dm.n + BM - 1) / BM), (unsigned)splits);
      if (dm.c > 0) {
        fwd_kernel<T><<<grid, THREADS, 0, stream>>>(
            reinterpret_cast<const T*>(x.data_ptr<scalar_t>()),
            reinterpret_cast<const T*>(w.data_ptr<scalar_t>()), labels.data_ptr<int64_t>(),
            idx, anorm.data_ptr<float>(), bnorm.data_ptr<float>(), p, target.data_ptr<float>(),
            part[0].data_ptr<float>(), part[1].data_ptr<float>(), part[2].data_ptr<float>(),
            part[3].data_ptr<float>(), part_a.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {  // empty shard: lse = -inf, sums 0
        part[0].fill_(-std::numeric_limits<float>::infinity());
        part[1].zero_();
        part[2].zero_();
        part[3].fill_(-std::numeric_limits<float>::infinity());
        part_a.fill_(std::numeric_limits<int64_t>::max());
      }
      fwd_combine_kernel<<<(unsigned)((dm.n + 255) / 256), 256, 0, stream>>>(
          part[0].data_ptr<float>(), part[1].data_ptr<float>(), part[2].data_ptr<float>(),
          part[3].data_ptr<float>(), part_a.data_ptr<int64_t>(), dm.n, splits, mp.s,
          lse.data_ptr<float>(), sum_z.data_ptr<float>(), max_z.data_ptr<float>(),
          argmax.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {lse, target, sum_z, max_z, argmax};
}

// Bytes of the backward's per-chunk buffers: the G workspace [N, chunk rows] and the
// chunk's W_hat / dW [chunk rows, D] are each at most this large (unless one class's
// K rows alone exceed it).
constexpr int64_t kWorkspaceBytes = int64_t(16) << 20;

// Blocks of WARP_ROWS warps for the one-warp-per-row kernels.
constexpr int WARP_ROWS = 8;
unsigned warp_row_blocks(int64_t rows) {
  const int64_t blocks = (rows + WARP_ROWS - 1) / WARP_ROWS;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "too many rows for one launch: ",
              rows);
  return (unsigned)blocks;
}

// Classes per backward chunk: as many as fit the workspace bound (whole tiles of p.tc
// classes when there is more than one tile's worth), or fewer when the block hint asks
// for fewer (a larger hint is capped: the bound holds whatever the hint).
int64_t bwd_chunk_classes(const Dims& dm, const Params& p, int64_t block, int64_t elem) {
  const int64_t rows_cap = kWorkspaceBytes / (elem * std::max<int64_t>({dm.n, dm.d, 1}));
  int64_t cc = std::max<int64_t>(1, rows_cap / dm.k);
  if (cc >= p.tc) cc -= cc % p.tc;
  if (block > 0) cc = std::min(cc, block);
  return std::max<int64_t>(1, std::min(cc, dm.c));
}

std::tuple<at::Tensor, at::Tensor> cpp_bwd_cuda(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& index_in, const at::Tensor& lse_in,
    const at::Tensor& gp_in, const at::Tensor& gt_in, const at::Tensor& gs_in, double s,
    double m1, double m2, double m3, int64_t wrap_mode, int64_t grad_mode, bool normalize,
    int64_t sub_centers, int64_t block) {
  Dims dm = check_fwd_args(x_in, w_in, labels_in, index_in, s, m1, m2, m3, wrap_mode,
                           grad_mode, normalize, sub_centers, block);
  check_cuda_args(x_in, dm);
  check_row_vector(lse_in, "lse", dm.n, x_in);
  check_row_vector(gp_in, "g_p", dm.n, x_in);
  check_row_vector(gt_in, "g_t", dm.n, x_in);
  check_row_vector(gs_in, "g_s", dm.n, x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  check_values(labels_in, index_in, dm);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const ContiguousInputs in = make_contiguous(x_in, w_in, labels_in, index_in);
  const at::Tensor &x = in.x, &w = in.w, &labels = in.labels;
  const std::optional<at::Tensor>& index = in.index;
  const int64_t* idx = in.idx();
  auto fopt = x.options().dtype(at::kFloat);
  // Rows of w outside the shard (index given) get 0; without an index every row of w is
  // a shard row and is written by its chunk.
  at::Tensor dx = at::empty({dm.n, dm.d}, x.options());
  at::Tensor dw = idx ? at::zeros({dm.r, dm.d}, w.options())
                      : at::empty({dm.r, dm.d}, w.options());
  if (dm.n == 0 || dm.c == 0 || dm.d == 0) {  // no logits: both gradients are 0
    dx.zero_();
    dw.zero_();
    return {dx, dw};
  }
  auto vec = [&](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  at::Tensor lse = vec(lse_in), gp = vec(gp_in), gt = vec(gt_in), gs = vec(gs_in);
  auto mp = make_margin<float>(s, m1, m2, m3, wrap_mode, grad_mode, normalize);
  Params p = make_params(dm, mp, x.get_device());
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
  // Rows of w of the shard rows, for index_add (index given).
  at::Tensor shard_rows;
  if (idx) {
    shard_rows = (index->unsqueeze(1) * dm.k +
                  at::arange(dm.k, index->options()).unsqueeze(0)).reshape({-1});
  }
  AK_DISPATCH_CUDA_TYPES(x.scalar_type(), "cpp_bwd_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    const T* xp = reinterpret_cast<const T*>(x.data_ptr<scalar_t>());
    const T* wp = reinterpret_cast<const T*>(w.data_ptr<scalar_t>());
    launch_inv_norms<scalar_t>(x, nullptr, dm.n, 1, dm.d, normalize, anorm, stream);
    launch_inv_norms<scalar_t>(w, idx, dm.c * dm.k, dm.k, dm.d, normalize, bnorm, stream);
    // X_hat (x itself when not normalizing)
    at::Tensor xh = x;
    if (normalize) {
      xh = at::empty({dm.n, dm.d}, x.options());
      scaled_rows_kernel<T><<<warp_row_blocks(dm.n), WARP_ROWS * 32, 0, stream>>>(
          xp, nullptr, 0, dm.n, 1, dm.d, anorm.data_ptr<float>(),
          reinterpret_cast<T*>(xh.data_ptr<scalar_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (int64_t j0 = 0; j0 < dm.c; j0 += cc) {
      const int64_t jn = std::min(cc, dm.c - j0), nrc = jn * dm.k, row0 = j0 * dm.k;
      // 1) G [N, nrc] into the workspace
      at::Tensor g = g_ws.narrow(0, 0, dm.n * nrc).view({dm.n, nrc});
      const int64_t tiles = (jn + p.tc - 1) / p.tc;
      dim3 grid((unsigned)((dm.n + BM - 1) / BM),
                (unsigned)std::min<int64_t>(tiles, 65535));
      grad_chunk_kernel<T><<<grid, THREADS, 0, stream>>>(
          xp, wp, labels.data_ptr<int64_t>(), idx, anorm.data_ptr<float>(),
          bnorm.data_ptr<float>(), lse.data_ptr<float>(), gp.data_ptr<float>(),
          gt.data_ptr<float>(), gs.data_ptr<float>(), p, j0, jn,
          reinterpret_cast<T*>(g.data_ptr<scalar_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // 2) W_hat of the chunk [nrc, D] (a view of w when there is nothing to gather/scale)
      at::Tensor wh;
      if (!normalize && !idx) {
        wh = w.narrow(0, row0, nrc);
      } else {
        wh = wh_ws.narrow(0, 0, nrc);
        scaled_rows_kernel<T><<<warp_row_blocks(nrc), WARP_ROWS * 32, 0, stream>>>(
            wp, idx, row0, nrc, dm.k, dm.d, bnorm.data_ptr<float>(),
            reinterpret_cast<T*>(wh.data_ptr<scalar_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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
      dw_chunk_finish_kernel<T><<<warp_row_blocks(nrc), WARP_ROWS * 32, 0, stream>>>(
          wp, idx, bnorm.data_ptr<float>(), row0, nrc, dm.k, dm.d, normalize,
          reinterpret_cast<T*>(dwc.data_ptr<scalar_t>()),
          idx ? nullptr : reinterpret_cast<T*>(dw.data_ptr<scalar_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (idx) dw.index_add_(0, shard_rows.narrow(0, row0, nrc), dwc);
    }
    // 5) dx = a (dX_acc - r x_hat)
    dx_finish_kernel<T><<<warp_row_blocks(dm.n), WARP_ROWS * 32, 0, stream>>>(
        xp, anorm.data_ptr<float>(), dx_acc.data_ptr<float>(), dm.n, dm.d, normalize,
        reinterpret_cast<T*>(dx.data_ptr<scalar_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw};
}

}  // namespace
}  // namespace arcface

TORCH_LIBRARY_IMPL(arcface_kernels, CUDA, m) {
  m.impl("cpp_fwd", &arcface::cpp_fwd_cuda);
  m.impl("cpp_bwd", &arcface::cpp_bwd_cuda);
}
