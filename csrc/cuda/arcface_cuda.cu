// CUDA kernel of the forward / backward primitive (shared/design.md section 3).
//
// Tiles of BM = 64 rows x TW = 64 rows of w (TC = TW / K classes). The grid is
// (row tiles, class splits): the class dimension is split across blocks, each block walks
// the class tiles of its split.
//   * Logits: S = x_tile . w_tile^T on tensor cores for float16 / bfloat16 (WMMA
//     16x16x16, fp32 accumulation), fp32 FMA for float32; then scaled by the inverse
//     norms a_i b_j in the epilogue (no normalized copy of x or w is made).
//   * Forward: two threads per row keep an online log-sum-exp over the split's classes;
//     the splits' partial states are merged by a second kernel (lse_merge).
//   * Backward: the tile is recomputed and turned into G = dL/dc in shared memory; then
//     dX_acc += G . (b w) and dW_acc += G^T . (a x) (fp32, atomics into [N, D] / [R, D]
//     fp32 accumulators), r_i = sum_j G c and q_j = sum_i G c likewise; a last kernel
//     applies dx = a (dX_acc - r a x), dw = b (dW_acc - q b w) in the input dtype.
// Nothing of size N x C exists. All offsets are 64-bit. The per-element math is
// csrc/arcface_math.h, shared with the CPU kernel.
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

// Shared memory of one block: the tile of dot products / G, and a union of the operand
// tiles of the logits product and the [64 x 64] float operand of the gradient products.
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
    float prod[TW][LDF];
  } u;
  int64_t wrow[TW];  // rows of w of the tile's columns (-1: past the shard)
  float b[TW];       // their inverse norms
  float q[TW];       // per-column sums of G c (backward)
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

// The tile's columns: rows of w and their inverse norms.
template <typename T>
__device__ void tile_columns(const int64_t* __restrict__ idx, const float* __restrict__ bnorm,
                             int64_t tile, const Params& p, Smem<T>& sm) {
  for (int t = threadIdx.x; t < TW; t += THREADS) {
    int64_t j = tile * p.tc + t / p.k;  // shard class of column t
    bool ok = t < p.tc * p.k && j < p.c;
    int64_t pos = j * p.k + t % p.k;  // shard row
    sm.wrow[t] = ok ? w_row(idx, pos, p.k) : -1;
    sm.b[t] = ok ? bnorm[pos] : 0.f;
    sm.q[t] = 0.f;
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
    tile_columns(idx, bnorm, tile, p, sm);
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
        if (z > m) {
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
    if (better_max(ob, oa, best, barg)) {
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

template <typename T>
__global__ void __launch_bounds__(THREADS)
    bwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const int64_t* __restrict__ lab,
               const int64_t* __restrict__ idx, const float* __restrict__ anorm,
               const float* __restrict__ bnorm, const float* __restrict__ lse,
               const float* __restrict__ gp, const float* __restrict__ gt,
               const float* __restrict__ gs, Params p, float* __restrict__ dx_acc,
               float* __restrict__ dw_acc, float* __restrict__ r_acc,
               float* __restrict__ q_acc) {
  __shared__ __align__(32) Smem<T> sm;
  const int64_t r0 = (int64_t)blockIdx.x * BM;
  const int64_t split = blockIdx.y;
  const int tid = threadIdx.x;
  const int i = tid / 2, h = tid % 2;
  const int64_t gi = r0 + i;
  const bool row_ok = gi < p.n;
  const float ai = row_ok ? anorm[gi] : 0.f;
  const int64_t li = row_ok ? lab[gi] : -1;
  const float lsei = row_ok ? lse[gi] : 0.f, gpi = row_ok ? gp[gi] : 0.f;
  const float gti = row_ok ? gt[gi] : 0.f, gsi = row_ok ? gs[gi] : 0.f;
  float r_i = 0.f;
  const int64_t t_begin = split * p.tiles_per_split;
  const int64_t t_end = min(p.ntiles, t_begin + p.tiles_per_split);
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    tile_columns(idx, bnorm, tile, p, sm);
    tile_dots(x, w, r0, p, sm);
    const int64_t j0 = tile * p.tc;
    const int tc = (int)min(p.tc, p.c - j0);
    // G in place of the dot products (only at the arg-max sub-center), 0 elsewhere
    float g_keep[(TW + 1) / 2];
    int c_keep[(TW + 1) / 2];
    int nk = 0;
    for (int jj = h; jj < tc; jj += 2) {
      float g = 0.f;
      int col = jj * (int)p.k;
      if (row_ok) {
        const float c = class_cosine(sm, i, jj, ai, p, &col);
        g = (j0 + jj == li) ? grad_target(c, lsei, gpi, gti, gsi, p.mp)
                            : grad_nontarget(p.mp.s * c, lsei, gpi, gsi, p.mp.s);
        r_i += g * c;
        atomicAdd(&sm.q[col], g * c);
      }
      g_keep[nk] = g;
      c_keep[nk] = col;
      ++nk;
    }
    __syncthreads();  // every read of the dot products is done
    for (int t = h; t < TW; t += 2) sm.s[i][t] = 0.f;  // the two threads cover the row
    __syncthreads();
    for (int e = 0; e < nk; ++e) sm.s[i][c_keep[e]] = g_keep[e];
    __syncthreads();
    // q_j: one atomic per column
    for (int t = tid; t < TW; t += THREADS)
      if (sm.wrow[t] >= 0) atomicAdd(&q_acc[sm.wrow[t]], sm.q[t]);
    // dX_acc[r0 + i, d] += sum_t G[i][t] b_t w[wrow_t, d]
    for (int64_t d0 = 0; d0 < p.d; d0 += TW) {
      for (int e = tid; e < TW * TW; e += THREADS) {
        int t = e / TW, dd = e % TW;
        int64_t wr = sm.wrow[t], gd = d0 + dd;
        sm.u.prod[t][dd] = (wr >= 0 && gd < p.d) ? to_f(w[wr * p.d + gd]) * sm.b[t] : 0.f;
      }
      __syncthreads();
      for (int e = tid; e < BM * TW; e += THREADS) {
        int ii = e / TW, dd = e % TW;
        int64_t row = r0 + ii, gd = d0 + dd;
        if (row >= p.n || gd >= p.d) continue;
        float acc = 0.f;
#pragma unroll 8
        for (int t = 0; t < TW; ++t) acc = fmaf(sm.s[ii][t], sm.u.prod[t][dd], acc);
        atomicAdd(&dx_acc[row * p.d + gd], acc);
      }
      __syncthreads();
      // dW_acc[wrow_t, d] += sum_i G[i][t] a_i x[r0 + i, d]
      for (int e = tid; e < BM * TW; e += THREADS) {
        int ii = e / TW, dd = e % TW;
        int64_t row = r0 + ii, gd = d0 + dd;
        sm.u.prod[ii][dd] = (row < p.n && gd < p.d) ? to_f(x[row * p.d + gd]) * anorm[row] : 0.f;
      }
      __syncthreads();
      for (int e = tid; e < TW * TW; e += THREADS) {
        int t = e / TW, dd = e % TW;
        int64_t wr = sm.wrow[t], gd = d0 + dd;
        if (wr < 0 || gd >= p.d) continue;
        float acc = 0.f;
#pragma unroll 8
        for (int ii = 0; ii < BM; ++ii) acc = fmaf(sm.s[ii][t], sm.u.prod[ii][dd], acc);
        atomicAdd(&dw_acc[wr * p.d + gd], acc);
      }
      __syncthreads();
    }
  }
  const float other = __shfl_xor_sync(0xffffffffu, r_i, 1);
  if (h == 0 && row_ok) atomicAdd(&r_acc[gi], r_i + other);
}

// dx = a (dX_acc - r a x) (normalize) or dX_acc, in the input dtype.
template <typename T>
__global__ void dx_finish_kernel(const T* __restrict__ x, const float* __restrict__ anorm,
                                 const float* __restrict__ dx_acc,
                                 const float* __restrict__ r_acc, int64_t n, int64_t d,
                                 bool normalize, T* __restrict__ dx) {
  int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n * d) return;
  int64_t i = e / d;
  float v = dx_acc[e];
  if (normalize) v = anorm[i] * (v - r_acc[i] * anorm[i] * to_f(x[e]));
  dx[e] = from_f<T>(v);
}

// dw = b (dW_acc - q b w) (normalize) or dW_acc, in the input dtype, for every row of w
// (rows outside the shard have dW_acc = q = 0); one warp per row.
template <typename T>
__global__ void dw_finish_kernel(const T* __restrict__ w, const float* __restrict__ dw_acc,
                                 const float* __restrict__ q_acc, int64_t rows, int64_t d,
                                 bool normalize, T* __restrict__ dw) {
  int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* src = w + row * d;
  float b = 1.f;
  if (normalize) {
    float ss = 0.f;
    for (int64_t t = lane; t < d; t += 32) {
      float e = to_f(src[t]);
      ss += e * e;
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    b = inv_norm(ss);
  }
  const float q = q_acc[row];
  for (int64_t t = lane; t < d; t += 32) {
    float v = dw_acc[row * d + t];
    // (q == 0 off the shard: its rows get exactly 0, whatever w holds there)
    if (normalize) v = b * (v - (q != 0.f ? q * b * to_f(src[t]) : 0.f));
    dw[row * d + t] = from_f<T>(v);
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
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), labels = labels_in.contiguous();
  std::optional<at::Tensor> index;
  if (index_in.has_value()) index = index_in->contiguous();
  const int64_t* idx = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
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
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), labels = labels_in.contiguous();
  std::optional<at::Tensor> index;
  if (index_in.has_value()) index = index_in->contiguous();
  const int64_t* idx = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  auto fopt = x.options().dtype(at::kFloat);
  auto vec = [&](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  at::Tensor lse = vec(lse_in), gp = vec(gp_in), gt = vec(gt_in), gs = vec(gs_in);
  at::Tensor dx = at::empty({dm.n, dm.d}, x.options());
  at::Tensor dw = at::empty({dm.r, dm.d}, w.options());
  auto mp = make_margin<float>(s, m1, m2, m3, wrap_mode, grad_mode, normalize);
  Params p = make_params(dm, mp, x.get_device());
  const int64_t splits = num_splits(p);
  at::Tensor anorm = at::empty({std::max<int64_t>(dm.n, 1)}, fopt);
  at::Tensor bnorm = at::empty({std::max<int64_t>(dm.c * dm.k, 1)}, fopt);
  at::Tensor dx_acc = at::zeros({dm.n, dm.d}, fopt), dw_acc = at::zeros({dm.r, dm.d}, fopt);
  at::Tensor r_acc = at::zeros({std::max<int64_t>(dm.n, 1)}, fopt);
  at::Tensor q_acc = at::zeros({std::max<int64_t>(dm.r, 1)}, fopt);
  AK_DISPATCH_CUDA_TYPES(x.scalar_type(), "cpp_bwd_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    {
      launch_inv_norms<scalar_t>(x, nullptr, dm.n, 1, dm.d, normalize, anorm, stream);
      launch_inv_norms<scalar_t>(w, idx, dm.c * dm.k, dm.k, dm.d, normalize, bnorm, stream);
      if (dm.n > 0 && dm.c > 0) {
        dim3 grid((unsigned)((dm.n + BM - 1) / BM), (unsigned)splits);
        bwd_kernel<T><<<grid, THREADS, 0, stream>>>(
            reinterpret_cast<const T*>(x.data_ptr<scalar_t>()),
            reinterpret_cast<const T*>(w.data_ptr<scalar_t>()), labels.data_ptr<int64_t>(),
            idx, anorm.data_ptr<float>(), bnorm.data_ptr<float>(), lse.data_ptr<float>(),
            gp.data_ptr<float>(), gt.data_ptr<float>(), gs.data_ptr<float>(), p,
            dx_acc.data_ptr<float>(), dw_acc.data_ptr<float>(), r_acc.data_ptr<float>(),
            q_acc.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (dm.n > 0) {
        const int64_t total = dm.n * dm.d;
        dx_finish_kernel<T><<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(
            reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), anorm.data_ptr<float>(),
            dx_acc.data_ptr<float>(), r_acc.data_ptr<float>(), dm.n, dm.d, normalize,
            reinterpret_cast<T*>(dx.data_ptr<scalar_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (dm.r > 0) {
        const int warps = 8;
        dw_finish_kernel<T><<<(unsigned)((dm.r + warps - 1) / warps), warps * 32, 0, stream>>>(
            reinterpret_cast<const T*>(w.data_ptr<scalar_t>()), dw_acc.data_ptr<float>(),
            q_acc.data_ptr<float>(), dm.r, dm.d, normalize,
            reinterpret_cast<T*>(dw.data_ptr<scalar_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {dx, dw};
}

}  // namespace
}  // namespace arcface

TORCH_LIBRARY_IMPL(arcface_kernels, CUDA, m) {
  m.impl("cpp_fwd", &arcface::cpp_fwd_cuda);
  m.impl("cpp_bwd", &arcface::cpp_bwd_cuda);
}
