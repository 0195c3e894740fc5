// CUDA kernels of the forward / backward primitive, and the runner that launches them.
// The host side (checks, tile split, backward chunks, buffers, the order of the launches
// and of the cuBLAS calls) is host.cpp, shared with the dry run of the static report.
//
// Tiles of BM = 64 rows x TW = 64 rows of w (TC = TW / K classes).
//   * Logits: S = x_tile . w_tile^T on tensor cores for float16 / bfloat16 (WMMA
//     16x16x16, fp32 accumulation), fp32 FMA for float32; then scaled by the inverse
//     norms a_i b_j in the epilogue (no normalized copy of x or w is made).
//   * Forward: the grid is (row tiles, class splits); two threads per row keep an online
//     log-sum-exp over the split's classes; the splits' partial states are merged by a
//     second kernel (lse_merge). Each logit is arcface_math.h logit_z: the interclass
//     filter, the margin at the target, the class's bias (staged per tile column in
//     shared memory with the inverse norms) and the softcap; the top-1 is over s c + bias
//     (c without a bias), capped by the combine kernel.
//   * The terms are optional: each tile kernel has a plain instance (fwd_kernel,
//     grad_chunk_kernel: no bias, softcap == 0, interclass == 0, the common case), which
//     contains none of their code (no bias staging, filter or tanh: the registers and
//     work of a kernel without them), and a terms instance (fwd_terms_kernel,
//     grad_chunk_terms_kernel) that tests each term at run time. The host picks one per
//     call (host.h uses_terms); both compute the same values where no term is set.
//   * Backward, bounded workspace: the classes are walked in chunks of CC classes
//     (CC*K rows of w; CC chosen so that the G workspace [N, CC*K] and the chunk's
//     [CC*K, D] buffers are each <= kWorkspaceBytes = 16 MiB, whatever C is; the `block`
//     op argument, the API's chunk_size, sets CC as given). Per chunk:
//       1. grad_chunk_kernel recomputes the chunk's logits tile by tile with the forward's
//          code (tile_columns / tile_dots / class_cosine) and writes
//          G_ij = dL/dc_ij (arcface_math.h grad_dv / grad_c: softcap', psi' at the target,
//          0 where filtered; for sub-centers at the arg-max row, 0 at the others) into
//          the workspace in the input dtype (fp32 for fp32);
//       2. W_hat = b w of the chunk's rows (gathered through the Partial FC index);
//       3. cuBLAS (at::mm / addmm_: tensor cores for 16-bit, fp32 accumulation):
//          dX_acc += G W_hat (fp32 [N, D]; for 16-bit the chunk's product comes back in
//          the input dtype and is added in fp32), dW_chunk = G^T X_hat;
//       4. dw rows = b (dW_chunk - q b w) with q_j = <w_hat_j, dW_chunk_j> (= sum_i G_ij
//          c_ij), fp32, written to their rows of w (index_add_ through the index: a
//          class may repeat).
//     With a bias, grad_chunk_kernel also keeps dL/dv per (row, class) of the tile in the
//     shared memory the operand tiles used, and writes the tile's column sums over its
//     64 rows (in row order) to [row tiles, chunk classes]; at::sum over the row tiles
//     gives each shard position's sum, and dbias = those sums (no index) or their
//     index_put_ (accumulate: sorted, deterministic) into the classes. No atomics.
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
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#if CUDART_VERSION < 12000
#error "the arcface-kernels CUDA kernels need CUDA 12.0 or newer (TMA, __grid_constant__)"
#endif

#include "../arcface_math.h"
#include "../ops.h"
#include "fused.cuh"
#include "host.h"

namespace arcface::cuda {
namespace {

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda),
// looked up once per process; nullptr where the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f,
                                                           12000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f,
                                                  cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // clear only this query's error
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The tensor map of a row-major [rows, d] 16-bit tensor read in boxes of box_rows rows x
// box_k features with the 128-byte swizzle (box_k * 2 = 128 bytes: one swizzle row per
// box row), zero fill past its edges. False where the driver has no encoder.
bool encode_rows_map(CUtensorMap* m, at::ScalarType t, const void* ptr, int64_t rows,
                     int64_t d, int box_rows, int box_k) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(d) * 2};  // bytes, of dim 1
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_k), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(
      m, t == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (CUresult ", int(r),
              ") for a [", rows, ", ", d, "] ", t, " tensor at ", ptr);
  return true;
}

// BM, TW, THREADS, MAX_K (tile shape) and Params come from host.h.
constexpr int BK = 32;        // features per step of the tile product
constexpr int LDF = TW + 4;   // leading dimension of float tiles (multiple of 4 for WMMA)
constexpr int LDH = BK + 8;   // leading dimension of 16-bit tiles (multiple of 8)
constexpr int LDK = BK + 1;   // leading dimension of float operand tiles (FMA path)
static_assert(BM == TW && (BM * BK) % THREADS == 0, "tile copy: whole rounds of THREADS");

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

// Row of w of shard position p (class p / K, sub-center p % K). The sub-center case's
// 64-bit division is a function of its own (a call where K > 1), out of the K = 1 code.
__device__ __noinline__ int64_t w_row_sub(const int64_t* idx, int64_t p, int64_t K) {
  return (idx ? idx[p / K] : p / K) * K + p % K;
}
__device__ __forceinline__ int64_t w_row(const int64_t* idx, int64_t p, int64_t K) {
  if (K == 1) return idx ? idx[p] : p;  // no 64-bit division in the common case
  return w_row_sub(idx, p, K);  // @cold[k == 1] (sub-centers: not in the modelled cases)
}

// Shared memory of one block: the tile of dot products (G in place in the backward),
// and a union of the operand tiles of the logits product (16-bit or float) and, once the
// product is done, the backward's dL/dv per (row, class) for dbias. The terms instances
// (kTerms) also stage the bias of the tile's columns; the plain ones have neither that
// nor room for dv (an empty base, a 1-row dv inside the union: the layout and size of
// the plain kernels' shared memory are those of a kernel without the terms).
template <bool kTerms>
struct SmemBias {};
template <>
struct SmemBias<true> {
  float bias[TW];  // the bias of the tile columns' class (0 without a bias)
};
template <typename T, bool kTerms>
struct Smem : SmemBias<kTerms> {
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
    float dv[kTerms ? BM : 1][TW + 1];  // [tile row][class of the tile] (backward, bias)
  } u;
  int64_t wrow[TW];  // rows of w of the tile's columns (-1: past the class range)
  float b[TW];       // their inverse norms
};

// A warp's pass over one row of d elements: f(t, value) for each element t of the lane's
// share, 16 bytes per load (8 half / 4 float elements) where the row allows (d a multiple
// of that, a 16-byte aligned start), else one element per load. Not unrolled: the @trips
// annotations count the machine loops exactly (the first for 16-bit rows).
template <typename T>
__device__ __forceinline__ bool row_vectorizable(const T* src, int64_t d) {
  return d % (16 / sizeof(T)) == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
}
template <typename T, typename F>
__device__ __forceinline__ void for_row(const T* __restrict__ src, int64_t d, int lane, F f) {
  constexpr int V = 16 / sizeof(T);
  if (row_vectorizable(src, d)) {
#pragma unroll 1
    for (int64_t t = lane * V; t < d; t += 32 * V) {  // @trips[cdiv(d, 256)]
      const uint4 raw = *reinterpret_cast<const uint4*>(src + t);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int u = 0; u < V; ++u) f(t + u, to_f(e[u]));
    }
  } else {
#pragma unroll 1
    for (int64_t t = lane; t < d; t += 32) f(t, to_f(src[t]));  // @trips[0 if d % 8 == 0 else cdiv(d, 32)]
  }
}

// 1 / |v| of a row whose sum of squares overflowed (|v| > ~1.8e19), again, scaled by its
// largest element (an inf element keeps the inf norm: inverse 0); the whole warp, lane 0
// writes, and flags the norm as above 2^63 (see inv_norm_kernel). Rows of such norms only.
template <typename T>
__device__ void inv_norm_overflowed(const T* __restrict__ src, int64_t d, int lane,
                                    float* __restrict__ out, int* __restrict__ unsafe) {
  float mx = 0.f;
#pragma unroll 1
  for (int64_t t = lane; t < d; t += 32) mx = fmaxf(mx, fabsf(to_f(src[t])));
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sc = 0.f;
  if (mx < INFINITY) {
#pragma unroll 1
    for (int64_t t = lane; t < d; t += 32) {
      const float e = to_f(src[t]) / mx;
      sc += e * e;
    }
    for (int o = 16; o > 0; o >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, o);
  }
  if (lane == 0) {
    *out = mx < INFINITY ? inv_norm_scaled(mx, sc) : 0.f;  // (inf: inv_norm(inf) = 0)
    if (unsafe) *unsafe = 1;  // (a norm above 2^63)
  }
}

// 1 / max(|v_row|, eps) for the rows of x (idx == nullptr, K == 1: identity map) or the
// shard's rows of w; one warp per row.
template <typename T>
__global__ void inv_norm_kernel(const T* __restrict__ v, const int64_t* __restrict__ idx,
                                int64_t rows, int64_t k, int64_t d, bool normalize,
                                float* __restrict__ out, int* __restrict__ unsafe) {
  int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* src = v + w_row(idx, row, k) * d;
  float ss = 0.f;
  for_row(src, d, lane, [&](int64_t, float e) { ss += e * e; });
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (normalize && ss == INFINITY) {
    inv_norm_overflowed(src, d, lane, out + row, unsafe);  // @cold (norms above ~1.8e19)
    return;
  }
  if (lane == 0) {
    const float inv = normalize ? inv_norm(ss) : 1.f;
    out[row] = inv;
    // a norm above 2^63: some |x_i| |w_j| may exceed 2^126, where the tile kernels' raw
    // fp32 dot products could overflow before the inverse norms scale them
    if (unsafe && inv < 1.08420217e-19f) *unsafe = 1;  // 2^-63
  }
}

// S[i][t] = <x_{r0+i}, w_{wrow[t]}> for the block's tile (raw dot products, fp32).
// Tensor cores for 16-bit types.
template <typename T, bool kTerms>
__device__ void tile_dots(const T* __restrict__ x, const T* __restrict__ w, int64_t r0,
                          const Params& p, Smem<T, kTerms>& sm) {
  const int tid = threadIdx.x;
  if constexpr (std::is_same_v<T, float>) {
    // 128 threads x (8 rows x 4 columns)
    const int ty = tid / 16, tx = tid % 16;
    float acc[8][4];
#pragma unroll
    for (int a = 0; a < 8; ++a)
#pragma unroll
      for (int b2 = 0; b2 < 4; ++b2) acc[a][b2] = 0.f;
    for (int64_t k0 = 0; k0 < p.d; k0 += BK) {  // @trips[cdiv(d, 32)]
#pragma unroll
      for (int it = 0; it < BM * BK / THREADS; ++it) {  // fixed trips: fully unrolled
        const int e = tid + it * THREADS;
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
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // no bfloat16 WMMA below sm_80: the host never launches these kernels there
#else
    using namespace nvcuda;
    const int warp = tid / 32;  // rows 16*warp .. +15, all 64 columns
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[TW / 16];
#pragma unroll
    for (int f = 0; f < TW / 16; ++f) wmma::fill_fragment(acc[f], 0.f);
    const T zero = from_f<T>(0.f);
    for (int64_t k0 = 0; k0 < p.d; k0 += BK) {  // @trips[cdiv(d, 32)]
#pragma unroll
      for (int it = 0; it < BM * BK / THREADS; ++it) {  // fixed trips: fully unrolled
        const int e = tid + it * THREADS;
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
#endif
  }
  __syncthreads();
}

// After tile_dots, when a norm above 2^63 was flagged (unsafe): every dot product of the
// tile recomputed as its cosine from the normalized elements (fused::safe_dot: no fp32
// overflow), and the column scales set to 1; the caller scales the row by 1 too.
template <typename T, bool kTerms>
__device__ void tile_fix_overflow(const T* __restrict__ x, const T* __restrict__ w,
                                  const float* __restrict__ anorm, int64_t r0, const Params& p,
                                  Smem<T, kTerms>& sm) {
  for (int e = threadIdx.x; e < BM * TW; e += THREADS) {  // @trips[0] (never on sane norms)
    const int i = e / TW, t = e % TW;
    const int64_t gi = r0 + i, wr = sm.wrow[t];
    if (gi < p.n && wr >= 0)
      sm.s[i][t] = fused::safe_dot(x + gi * p.d, w + wr * p.d, p.d, anorm[gi], sm.b[t]);
  }
  __syncthreads();
  for (int t = threadIdx.x; t < TW; t += THREADS) sm.b[t] = 1.f;
  __syncthreads();
}

// The columns of the tile whose first shard class is j0 (classes j0 .. min(j0 + tc,
// j_end) - 1): rows of w, their inverse norms and, in the terms instances, the bias of
// their class (bias[class id], the class id being row / K; 0 without a bias).
template <typename T, bool kTerms>
__device__ void tile_columns(const int64_t* __restrict__ idx, const float* __restrict__ bnorm,
                             const T* __restrict__ bias, int64_t j0, int64_t j_end,
                             const Params& p, Smem<T, kTerms>& sm) {
  for (int t = threadIdx.x; t < TW; t += THREADS) {
    int64_t j = j0 + t / p.k;  // shard class of column t
    bool ok = t < p.tc * p.k && j < j_end;
    int64_t pos = j * p.k + t % p.k;  // shard row
    const int64_t wr = ok ? w_row(idx, pos, p.k) : -1;
    sm.wrow[t] = wr;
    sm.b[t] = ok ? bnorm[pos] : 0.f;
    if constexpr (kTerms) sm.bias[t] = (ok && bias) ? to_f(bias[wr / p.k]) : 0.f;
  }
  __syncthreads();
}

// Class cosine of tile row i, class jj (max over its sub-centers) and the arg-max column.
template <typename T, bool kTerms>
__device__ __forceinline__ float class_cosine(const Smem<T, kTerms>& sm, int i, int jj, float ai,
                                              const Params& p, int* col) {
  int t0 = jj * (int)p.k;
  float best = cosine(sm.s[i][t0] * ai * sm.b[t0], p.mp.normalize);
  int bc = t0;
  for (int kk = 1; kk < p.k; ++kk) {  // @trips[k - 1] (static report: bench/static)
    float v = cosine(sm.s[i][t0 + kk] * ai * sm.b[t0 + kk], p.mp.normalize);
    if (better_max(v, (int64_t)kk, best, (int64_t)(bc - t0))) {
      best = v;
      bc = t0 + kk;
    }
  }
  *col = bc;
  return best;
}

// The forward of one block (fwd_kernel / fwd_terms_kernel below). kTerms = false: the
// plain logits z = s c (s psi(c) at the target), the top-1 over c; no bias, softcap or
// filter code at all (bias is unused). kTerms = true: arcface_math.h logit_z, each of
// the terms applied when set (a runtime test each; bias may be nullptr).
template <typename T, bool kTerms>
__device__ __forceinline__ void fwd_block(
    const T* __restrict__ x, const T* __restrict__ w, const int64_t* __restrict__ lab,
    const int64_t* __restrict__ idx, const T* __restrict__ bias,
    const float* __restrict__ anorm, const float* __restrict__ bnorm, const Params& p,
    float* __restrict__ target, float* __restrict__ part_m, float* __restrict__ part_s,
    float* __restrict__ part_z, float* __restrict__ part_b, int64_t* __restrict__ part_a) {
  __shared__ __align__(32) Smem<T, kTerms> sm;
  const int64_t r0 = (int64_t)blockIdx.x * BM;
  const int64_t split = blockIdx.y;
  const int i = threadIdx.x / 2, h = threadIdx.x % 2;
  const int64_t gi = r0 + i;
  const bool row_ok = gi < p.n;
  const bool unsafe = *p.unsafe;  // overflow-free tiles (tile_fix_overflow), row scale 1
  const float ai = row_ok ? (unsafe ? 1.f : anorm[gi]) : 0.f;
  const int64_t li = row_ok ? lab[gi] : -1;
  float m = -INFINITY, se = 0.f, sz = 0.f, best = -INFINITY;
  int64_t barg = std::numeric_limits<int64_t>::max();
  const int64_t t_begin = split * p.tiles_per_split;
  const int64_t t_end = min(p.ntiles, t_begin + p.tiles_per_split);
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    tile_columns(idx, bnorm, bias, tile * p.tc, p.c, p, sm);
    tile_dots(x, w, r0, p, sm);
    if (unsafe) tile_fix_overflow(x, w, anorm, r0, p, sm);
    const int64_t j0 = tile * p.tc;
    const int tc = (int)min(p.tc, p.c - j0);
    if (row_ok) {
      for (int jj = h; jj < tc; jj += 2) {  // @trips[tc / 2]
        int col;
        const float c = class_cosine(sm, i, jj, ai, p, &col);
        const int64_t j = j0 + jj;
        float z;
        if constexpr (kTerms) {
          const float bj = sm.bias[jj * (int)p.k];
          // top-1 over s c + bias (raw c: no margin, no filter), or over c without a bias
          const float key = bias ? p.mp.s * c + bj : c;
          if (better_max(key, j, best, barg)) {
            best = key;
            barg = j;
          }
          const bool is_t = j == li;
          z = logit_z(c, is_t, bj, p.mp);  // filter, margin, bias, softcap
          if (is_t) target[gi] = z;  // the only thread that holds (i, label_i)
        } else {
          if (better_max(c, j, best, barg)) {
            best = c;
            barg = j;
          }
          z = p.mp.s * c;
          if (j == li) {
            z = p.mp.s * psi(c, p.mp);
            target[gi] = z;  // the only thread that holds (i, label_i)
          }
        }
        sz += z;
        Lse<float> st{m, se};  // NaN sticks, -inf adds nothing (arcface_math.h)
        lse_push(st, z);
        m = st.m;
        se = st.sum;
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

// The forward's tile kernel, plain (no bias, softcap == 0, interclass == 0: the common
// case) and with the terms; the host picks one per call (host.h uses_terms). Two kernel
// names, one template argument (the dtype) each, rather than a bool template argument:
// the static report finds a kernel's instance by its name and dtype.
template <typename T>
__global__ void __launch_bounds__(THREADS)
    fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const int64_t* __restrict__ lab,
               const int64_t* __restrict__ idx, const float* __restrict__ anorm,
               const float* __restrict__ bnorm, Params p, float* __restrict__ target,
               float* __restrict__ part_m, float* __restrict__ part_s,
               float* __restrict__ part_z, float* __restrict__ part_b,
               int64_t* __restrict__ part_a) {
  fwd_block<T, false>(x, w, lab, idx, nullptr, anorm, bnorm, p, target, part_m, part_s,
                      part_z, part_b, part_a);
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
    fwd_terms_kernel(const T* __restrict__ x, const T* __restrict__ w,
                     const int64_t* __restrict__ lab, const int64_t* __restrict__ idx,
                     const T* __restrict__ bias, const float* __restrict__ anorm,
                     const float* __restrict__ bnorm, Params p, float* __restrict__ target,
                     float* __restrict__ part_m, float* __restrict__ part_s,
                     float* __restrict__ part_z, float* __restrict__ part_b,
                     int64_t* __restrict__ part_a) {
  fwd_block<T, true>(x, w, lab, idx, bias, anorm, bnorm, p, target, part_m, part_s, part_z,
                     part_b, part_a);
}

__global__ void fwd_combine_kernel(const float* __restrict__ part_m,
                                   const float* __restrict__ part_s,
                                   const float* __restrict__ part_z,
                                   const float* __restrict__ part_b,
                                   const int64_t* __restrict__ part_a, int64_t n,
                                   int64_t splits, Margin<float> mp, bool bias_key,
                                   float* __restrict__ lse,
                                   float* __restrict__ sum_z, float* __restrict__ max_z,
                                   int64_t* __restrict__ argmax) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  Lse<float> l = lse_empty<float>();
  float z = 0.f, best = -INFINITY;
  int64_t arg = std::numeric_limits<int64_t>::max();
  for (int64_t sp = 0; sp < splits; ++sp) {  // @trips[splits]
    const int64_t o = sp * n + i;
    l = lse_merge(l, Lse<float>{part_m[o], part_s[o]});
    z += part_z[o];
    if (better_max(part_b[o], part_a[o], best, arg)) {
      best = part_b[o];
      arg = part_a[o];
    }
  }
  const bool empty = arg == std::numeric_limits<int64_t>::max();  // no class in the shard
  lse[i] = lse_value(l);
  sum_z[i] = z;
  // the capped max logit (s c + bias, or s c), -inf for an empty shard
  max_z[i] = empty ? -INFINITY : softcap_map(bias_key ? best : mp.s * best, mp);
  argmax[i] = empty ? 0 : arg;
}

// ----------------------------------------------------------------------------- backward
// G = dL/dc for the rows of x and the classes [j0, j0 + jn) of one chunk, written to the
// workspace g_out [N, jn*K] (row-major, leading dimension jn*K) in the input dtype (fp32
// for fp32): the logits are recomputed tile by tile as in the forward (tile_columns,
// tile_dots, class_cosine), G replaces them in shared memory (at the arg-max sub-center
// of each class, 0 at its other sub-centers) and the tile is stored row by row. The
// grid is (row tiles, tiles of the chunk, strided when there are more than 65535).
// kTerms = false (grad_chunk_kernel): grad_target / grad_nontarget, no bias, softcap or
// filter code, no dbias; kTerms = true (grad_chunk_terms_kernel): grad_dv / grad_c, each
// term applied when set, and dbias_part written when given (with a bias).
template <typename T, bool kTerms>
__device__ __forceinline__ void grad_chunk_block(
    const T* __restrict__ x, const T* __restrict__ w, const int64_t* __restrict__ lab,
    const int64_t* __restrict__ idx, const T* __restrict__ bias,
    const float* __restrict__ anorm, const float* __restrict__ bnorm,
    const float* __restrict__ lse, const float* __restrict__ gp, const float* __restrict__ gt,
    const float* __restrict__ gs, const Params& p, int64_t j0, int64_t jn,
    T* __restrict__ g_out, float* __restrict__ dbias_part) {
  __shared__ __align__(32) Smem<T, kTerms> sm;
  const int64_t r0 = (int64_t)blockIdx.x * BM;
  const int tid = threadIdx.x;
  const int i = tid / 2, h = tid % 2;  // two threads per tile row, classes interleaved
  const int64_t gi = r0 + i;
  const bool row_ok = gi < p.n;
  const bool unsafe = *p.unsafe;  // as in fwd_block
  const float ai = row_ok ? (unsafe ? 1.f : anorm[gi]) : 0.f;
  const int64_t li = row_ok ? lab[gi] : -1;
  const float lsei = row_ok ? lse[gi] : 0.f, gpi = row_ok ? gp[gi] : 0.f;
  const float gti = row_ok ? gt[gi] : 0.f, gsi = row_ok ? gs[gi] : 0.f;
  const int64_t ld = p.ldg;  // the workspace's leading dimension (host.cpp: % 8 == 0)
  const int64_t j_end = j0 + jn;
  const int64_t ntiles = (jn + p.tc - 1) / p.tc;
  for (int64_t tl = blockIdx.y; tl < ntiles; tl += gridDim.y) {
    const int64_t jt = j0 + tl * p.tc;  // first class of the tile
    tile_columns(idx, bnorm, bias, jt, j_end, p, sm);
    tile_dots(x, w, r0, p, sm);
    if (unsafe) tile_fix_overflow(x, w, anorm, r0, p, sm);
    const int tc = (int)min(p.tc, j_end - jt);
    if (row_ok) {
      // class jj's K columns are read and written by this thread only: G goes in place
      for (int jj = h; jj < tc; jj += 2) {  // @trips[tc / 2]
        int col;
        const float c = class_cosine(sm, i, jj, ai, p, &col);
        const int t0 = jj * (int)p.k;
        float g;
        if constexpr (kTerms) {
          const bool is_t = jt + jj == li;
          // dL/dv (the element's share of dbias), then G
          const float dv = grad_dv(c, is_t, sm.bias[t0], lsei, gpi, gti, gsi, p.mp);
          g = grad_c(c, is_t, dv, p.mp);
          if (dbias_part) sm.u.dv[i][jj] = dv;  // operand tiles are dead (tile_dots synced)
        } else {
          g = (jt + jj == li) ? grad_target(c, lsei, gpi, gti, gsi, p.mp)
                              : grad_nontarget(p.mp.s * c, lsei, gpi, gsi, p.mp.s);
        }
        for (int kk = 0; kk < (int)p.k; ++kk) sm.s[i][t0 + kk] = (t0 + kk == col) ? g : 0.f;
      }
    } else if constexpr (kTerms) {
      if (dbias_part) {  // a row past N adds nothing to dbias
        for (int jj = h; jj < tc; jj += 2) sm.u.dv[i][jj] = 0.f;  // @trips[tc / 2]
      }
    }
    __syncthreads();
    if constexpr (kTerms) {
      if (dbias_part && tid < TW) {
        // the tile's column sums of dL/dv over its BM rows, in row order (a fixed trip
        // count: a loop over the valid rows only made ptxas cap the kernel at 128
        // registers and spill)
        float acc = 0.f;
#pragma unroll 8
        for (int ii = 0; ii < BM; ++ii) acc += sm.u.dv[ii][tid];  // @trips[8] (unrolled)
        if (tid < tc) dbias_part[(int64_t)blockIdx.x * jn + (jt - j0) + tid] = acc;
      }
    }
    const int cols = tc * (int)p.k;
    const int64_t c0 = (jt - j0) * p.k;  // workspace column of the tile's column 0
    for (int e = tid; e < BM * TW; e += THREADS) {
      const int ii = e / TW, t = e % TW;
      const int64_t row = r0 + ii;
      if (row < p.n && t < cols) g_out[row * ld + c0 + t] = from_f<T>(sm.s[ii][t]);
    }
    __syncthreads();  // the tile (and dv) is read before the next one overwrites it
  }
}

// The backward's G kernel, plain and with the terms (as fwd_kernel / fwd_terms_kernel).
template <typename T>
__global__ void __launch_bounds__(THREADS)
    grad_chunk_kernel(const T* __restrict__ x, const T* __restrict__ w,
                      const int64_t* __restrict__ lab, const int64_t* __restrict__ idx,
                      const float* __restrict__ anorm, const float* __restrict__ bnorm,
                      const float* __restrict__ lse, const float* __restrict__ gp,
                      const float* __restrict__ gt, const float* __restrict__ gs, Params p,
                      int64_t j0, int64_t jn, T* __restrict__ g_out) {
  grad_chunk_block<T, false>(x, w, lab, idx, nullptr, anorm, bnorm, lse, gp, gt, gs, p, j0,
                             jn, g_out, nullptr);
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
    grad_chunk_terms_kernel(const T* __restrict__ x, const T* __restrict__ w,
                            const int64_t* __restrict__ lab, const int64_t* __restrict__ idx,
                            const T* __restrict__ bias, const float* __restrict__ anorm,
                            const float* __restrict__ bnorm, const float* __restrict__ lse,
                            const float* __restrict__ gp, const float* __restrict__ gt,
                            const float* __restrict__ gs, Params p, int64_t j0, int64_t jn,
                            T* __restrict__ g_out, float* __restrict__ dbias_part) {
  grad_chunk_block<T, true>(x, w, lab, idx, bias, anorm, bnorm, lse, gp, gt, gs, p, j0, jn,
                            g_out, dbias_part);
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
  constexpr int V = 16 / sizeof(T);
  if (row_vectorizable(src, d) && row_vectorizable<T>(dst, d)) {
#pragma unroll 1
    for (int64_t t = lane * V; t < d; t += 32 * V) {  // @trips[cdiv(d, 256)]
      uint4 raw = *reinterpret_cast<const uint4*>(src + t);
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int u = 0; u < V; ++u) e[u] = from_f<T>(to_f(e[u]) * sc);
      *reinterpret_cast<uint4*>(dst + t) = raw;
    }
  } else {
#pragma unroll 1
    for (int64_t t = lane; t < d; t += 32) dst[t] = from_f<T>(to_f(src[t]) * sc);  // @trips[0 if d % 8 == 0 else cdiv(d, 32)]
  }
}

// The chunk's rows of dw from u = dwc [rows, D] = G^T x_hat in float32 (shard rows
// row0 .. row0 + rows - 1): with w_hat = b w in fp32, q = <w_hat, u> (= sum_i G_ij c_ij)
// and dw = norm_grad(u, q, w_hat, b) (normalize) or u, rounded to T once; prescaled: u
// already carries b (G was written as G b: u = b G^T x_hat), and dw =
// norm_grad_prescaled(u, q, w_hat, b), the same value. Written to dw's row of w (direct:
// no index, each row of w belongs to one shard row), else to row rr of out (the caller
// index_adds it: a class may repeat in the index). One warp per row.
template <typename T>
__global__ void dw_chunk_finish_kernel(const T* __restrict__ w,
                                       const int64_t* __restrict__ idx,
                                       const float* __restrict__ bnorm, int64_t row0,
                                       int64_t rows, int64_t k, int64_t d, bool normalize,
                                       const float* __restrict__ dwc, T* __restrict__ out,
                                       bool direct, bool prescaled) {
  const int64_t rr = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (rr >= rows) return;
  const int64_t wr = w_row(idx, row0 + rr, k);
  const T* src = w + wr * d;
  const float b = bnorm[row0 + rr];
  const float outer = prescaled ? 1.f : b;  // norm_grad's factor, unless u carries it
  const float* u = dwc + rr * d;
  T* dst = out + (direct ? wr : rr) * d;
  constexpr int V = 16 / sizeof(T);  // elements of T per 16-byte load
  const bool vec = row_vectorizable(src, d) && row_vectorizable<T>(dst, d) &&
                   reinterpret_cast<uintptr_t>(u) % 16 == 0;
  float q = 0.f;
  if (normalize) {
    if (vec) {
#pragma unroll 1
      for (int64_t t = lane * V; t < d; t += 32 * V) {  // @trips[cdiv(d, 256)]
        const uint4 raw = *reinterpret_cast<const uint4*>(src + t);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int v = 0; v < V; ++v) q += b * to_f(e[v]) * u[t + v];
      }
    } else {
#pragma unroll 1
      for (int64_t t = lane; t < d; t += 32) q += b * to_f(src[t]) * u[t];  // @trips[0 if d % 8 == 0 else cdiv(d, 32)]
    }
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
  }
  if (vec) {
#pragma unroll 1
    for (int64_t t = lane * V; t < d; t += 32 * V) {  // @trips[cdiv(d, 256)]
      uint4 raw = *reinterpret_cast<const uint4*>(src + t);
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float g = u[t + v];
        if (normalize) g = outer * norm_grad_prescaled(g, q, b * to_f(e[v]), b);
        e[v] = from_f<T>(g);
      }
      *reinterpret_cast<uint4*>(dst + t) = raw;
    }
  } else {
#pragma unroll 1
    for (int64_t t = lane; t < d; t += 32) {  // @trips[0 if d % 8 == 0 else cdiv(d, 32)]
      float v = u[t];
      if (normalize) v = outer * norm_grad_prescaled(v, q, b * to_f(src[t]), b);
      dst[t] = from_f<T>(v);
    }
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
#pragma unroll 1
    for (int64_t t = lane; t < d; t += 32) r += a * to_f(src[t]) * u[t];  // @trips[cdiv(d, 32)]
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  }
#pragma unroll 1
  for (int64_t t = lane; t < d; t += 32) {  // @trips[cdiv(d, 32)]
    float v = u[t];
    if (normalize) v = norm_grad(v, r, a * to_f(src[t]), a);
    dx[i * d + t] = from_f<T>(v);
  }
}


// float32 / float16 / bfloat16 (the CUDA kernel has no float64 path; host.cpp rejects it).
#define AK_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Typed device pointer of a tensor of c10 type c10_t (CUDA's native type for 16-bit).
template <typename c10_t>
const typename Native<c10_t>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename Native<c10_t>::type*>(t.data_ptr<c10_t>());
}
template <typename c10_t>
typename Native<c10_t>::type* mptr(at::Tensor& t) {
  return reinterpret_cast<typename Native<c10_t>::type*>(t.data_ptr<c10_t>());
}
const int64_t* idx_ptr(const at::Tensor* idx) {
  return idx ? idx->data_ptr<int64_t>() : nullptr;
}
dim3 grid_of(const Launch& l) { return dim3((unsigned)l.grid_x, (unsigned)l.grid_y); }

// Launches each kernel on the current stream of the current device (the caller holds a
// CUDAGuard for x's device), with a launch check after it.
class CudaRunner final : public KernelRunner {
 public:
  int num_sms(const at::Tensor& x) override {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                          x.get_device()));
    return std::max(sms, 1);
  }

  int capability(const at::Tensor& x) override {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                          x.get_device()));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor,
                                          x.get_device()));
    return major * 10 + minor;
  }

  bool aligned16(const at::Tensor& t) override {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  }

  Fused fused_kind(const at::Tensor& x) override {
    // per device, decided once (host-side queries only: no sync, capturable)
    static std::mutex mu;
    static std::unordered_map<int, Fused> known;
    const int dev = x.get_device();
    std::lock_guard<std::mutex> lock(mu);
    auto it = known.find(dev);
    if (it != known.end()) return it->second;
    const int cap = capability(x);
    Fused kind = cap < 80 ? Fused::kNone : Fused::kSm80;
    if (cap == 90) {
      // the wgmma kernels are compiled in for this device (sm_90a code, not a plain sm_90
      // cubin or a JIT of compute_80 / compute_90 PTX, where they are traps): the probe
      // kernel then has static shared memory its twin lacks
      cudaFuncAttributes probe, twin;
      const cudaError_t e1 = cudaFuncGetAttributes(&probe, fused::sm90a_probe_kernel);
      const cudaError_t e2 = cudaFuncGetAttributes(&twin, fused::sm90a_probe_twin_kernel);
      if (e1 == cudaSuccess && e2 == cudaSuccess) {
        if (probe.sharedSizeBytes > twin.sharedSizeBytes) kind = Fused::kSm90;
      } else {
        (void)cudaGetLastError();  // clear only the error of these queries
      }
    }
    known.emplace(dev, kind);
    return kind;
  }

  void fused_fwd(Fused kind, const Launch& l, const at::Tensor& x, const at::Tensor& w,
                 const at::Tensor& labels, const at::Tensor* idx, const at::Tensor& anorm,
                 const at::Tensor& bnorm, const at::Tensor& unsafe, const FusedParams& p,
                 at::Tensor& target, at::Tensor& part, at::Tensor& part_a) override {
    fused::FusedArgs a{};
    fill_common(a, x, w, labels, idx, anorm, bnorm, unsafe);
    a.target = target.data_ptr<float>();
    a.part_m = part[0].data_ptr<float>();
    a.part_s = part[1].data_ptr<float>();
    a.part_z = part[2].data_ptr<float>();
    a.part_b = part[3].data_ptr<float>();
    a.part_a = part_a.data_ptr<int64_t>();
    launch_fused(kind, /*grad=*/false, x.scalar_type(), l, a, p, tma_maps(kind, p, x, w));
  }

  void fused_grad(Fused kind, const Launch& l, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& labels, const at::Tensor* idx, const at::Tensor& anorm,
                  const at::Tensor& bnorm, const at::Tensor& unsafe, const at::Tensor& lse,
                  const at::Tensor& gp, const at::Tensor& gt, const at::Tensor& gs,
                  const FusedParams& p, at::Tensor& g) override {
    fused::FusedArgs a{};
    fill_common(a, x, w, labels, idx, anorm, bnorm, unsafe);
    a.lse = lse.data_ptr<float>();
    a.gp = gp.data_ptr<float>();
    a.gt = gt.data_ptr<float>();
    a.gs = gs.data_ptr<float>();
    a.g = g.data_ptr();
    launch_fused(kind, /*grad=*/true, x.scalar_type(), l, a, p, tma_maps(kind, p, x, w));
  }

  void inv_norm(const Launch& l, const at::Tensor& v, const at::Tensor* idx, int64_t rows,
                int64_t k, int64_t d, bool normalize, at::Tensor& out,
                at::Tensor* unsafe) override {
    AK_DISPATCH_CUDA_TYPES(v.scalar_type(), "inv_norm", [&] {
      inv_norm_kernel<<<grid_of(l), l.threads, 0, stream()>>>(
          cptr<scalar_t>(v), idx_ptr(idx), rows, k, d, normalize, out.data_ptr<float>(),
          unsafe ? unsafe->data_ptr<int>() : nullptr);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void fwd(const Launch& l, const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
           const at::Tensor* idx, bool terms, const at::Tensor* bias, const at::Tensor& anorm,
           const at::Tensor& bnorm, const at::Tensor& unsafe, const Params& p_in,
           at::Tensor& target, at::Tensor& part, at::Tensor& part_a) override {
    TORCH_CHECK(terms || !bias, "fwd: a bias needs the terms kernel");
    Params p = p_in;
    p.unsafe = unsafe.const_data_ptr<int>();
    AK_DISPATCH_CUDA_TYPES(x.scalar_type(), "fwd", [&] {
      if (terms) {
        fwd_terms_kernel<<<grid_of(l), l.threads, 0, stream()>>>(
            cptr<scalar_t>(x), cptr<scalar_t>(w), labels.data_ptr<int64_t>(), idx_ptr(idx),
            bias ? cptr<scalar_t>(*bias) : nullptr, anorm.data_ptr<float>(),
            bnorm.data_ptr<float>(), p, target.data_ptr<float>(),
            part[0].data_ptr<float>(), part[1].data_ptr<float>(),
            part[2].data_ptr<float>(), part[3].data_ptr<float>(),
            part_a.data_ptr<int64_t>());
      } else {
        fwd_kernel<<<grid_of(l), l.threads, 0, stream()>>>(
            cptr<scalar_t>(x), cptr<scalar_t>(w), labels.data_ptr<int64_t>(), idx_ptr(idx),
            anorm.data_ptr<float>(), bnorm.data_ptr<float>(), p, target.data_ptr<float>(),
            part[0].data_ptr<float>(), part[1].data_ptr<float>(),
            part[2].data_ptr<float>(), part[3].data_ptr<float>(),
            part_a.data_ptr<int64_t>());
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void fwd_combine(const Launch& l, const at::Tensor& part, const at::Tensor& part_a,
                   int64_t n, int64_t splits, const Margin<float>& mp, bool bias_key,
                   at::Tensor& lse, at::Tensor& sum_z, at::Tensor& max_z,
                   at::Tensor& argmax) override {
    fwd_combine_kernel<<<grid_of(l), l.threads, 0, stream()>>>(
        part[0].data_ptr<float>(), part[1].data_ptr<float>(), part[2].data_ptr<float>(),
        part[3].data_ptr<float>(), part_a.data_ptr<int64_t>(), n, splits, mp, bias_key,
        lse.data_ptr<float>(), sum_z.data_ptr<float>(), max_z.data_ptr<float>(),
        argmax.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void scaled_rows(const Launch& l, const at::Tensor& v, const at::Tensor* idx, int64_t row0,
                   int64_t rows, int64_t k, int64_t d, const at::Tensor& scale,
                   at::Tensor& out) override {
    AK_DISPATCH_CUDA_TYPES(v.scalar_type(), "scaled_rows", [&] {
      scaled_rows_kernel<<<grid_of(l), l.threads, 0, stream()>>>(
          cptr<scalar_t>(v), idx_ptr(idx), row0, rows, k, d, scale.data_ptr<float>(),
          mptr<scalar_t>(out));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void grad_chunk(const Launch& l, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& labels, const at::Tensor* idx, bool terms,
                  const at::Tensor* bias, const at::Tensor& anorm, const at::Tensor& bnorm,
                  const at::Tensor& unsafe, const at::Tensor& lse, const at::Tensor& gp,
                  const at::Tensor& gt, const at::Tensor& gs, const Params& p_in, int64_t j0,
                  int64_t jn, at::Tensor& g, at::Tensor* dbias_part) override {
    TORCH_CHECK(terms || (!bias && !dbias_part), "grad_chunk: a bias needs the terms kernel");
    Params p = p_in;
    p.unsafe = unsafe.const_data_ptr<int>();
    AK_DISPATCH_CUDA_TYPES(x.scalar_type(), "grad_chunk", [&] {
      if (terms) {
        grad_chunk_terms_kernel<<<grid_of(l), l.threads, 0, stream()>>>(
            cptr<scalar_t>(x), cptr<scalar_t>(w), labels.data_ptr<int64_t>(), idx_ptr(idx),
            bias ? cptr<scalar_t>(*bias) : nullptr, anorm.data_ptr<float>(),
            bnorm.data_ptr<float>(), lse.data_ptr<float>(), gp.data_ptr<float>(),
            gt.data_ptr<float>(), gs.data_ptr<float>(), p, j0, jn, mptr<scalar_t>(g),
            dbias_part ? dbias_part->data_ptr<float>() : nullptr);
      } else {
        grad_chunk_kernel<<<grid_of(l), l.threads, 0, stream()>>>(
            cptr<scalar_t>(x), cptr<scalar_t>(w), labels.data_ptr<int64_t>(), idx_ptr(idx),
            anorm.data_ptr<float>(), bnorm.data_ptr<float>(), lse.data_ptr<float>(),
            gp.data_ptr<float>(), gt.data_ptr<float>(), gs.data_ptr<float>(), p, j0, jn,
            mptr<scalar_t>(g));
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void dw_chunk_finish(const Launch& l, const at::Tensor& w, const at::Tensor* idx,
                       const at::Tensor& bnorm, int64_t row0, int64_t rows, int64_t k,
                       int64_t d, bool normalize, const at::Tensor& dwc, at::Tensor& out,
                       bool direct, bool prescaled) override {
    AK_DISPATCH_CUDA_TYPES(w.scalar_type(), "dw_chunk_finish", [&] {
      dw_chunk_finish_kernel<<<grid_of(l), l.threads, 0, stream()>>>(
          cptr<scalar_t>(w), idx_ptr(idx), bnorm.data_ptr<float>(), row0, rows, k, d,
          normalize, dwc.data_ptr<float>(), mptr<scalar_t>(out), direct, prescaled);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void dx_finish(const Launch& l, const at::Tensor& x, const at::Tensor& anorm,
                 const at::Tensor& dx_acc, int64_t n, int64_t d, bool normalize,
                 at::Tensor& dx) override {
    AK_DISPATCH_CUDA_TYPES(x.scalar_type(), "dx_finish", [&] {
      dx_finish_kernel<<<grid_of(l), l.threads, 0, stream()>>>(
          cptr<scalar_t>(x), anorm.data_ptr<float>(), dx_acc.data_ptr<float>(), n, d,
          normalize, mptr<scalar_t>(dx));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

  static void fill_common(fused::FusedArgs& a, const at::Tensor& x, const at::Tensor& w,
                          const at::Tensor& labels, const at::Tensor* idx,
                          const at::Tensor& anorm, const at::Tensor& bnorm,
                          const at::Tensor& unsafe) {
    a.unsafe = unsafe.const_data_ptr<int>();
    a.x = x.const_data_ptr();
    a.w = w.const_data_ptr();
    a.labels = labels.data_ptr<int64_t>();
    a.idx = idx_ptr(idx);
    a.anorm = anorm.data_ptr<float>();
    a.bnorm = bnorm.data_ptr<float>();
  }

  // The TMA kernels' tensor maps of x [n, d] and w [rows, d] (p.tma: sm_90a, no index),
  // or nullptr: the cp.async kernels (also where the driver has no tensor-map encoder).
  // Encoded once per call (a runner lives for one forward or backward: every chunk's
  // launch reads the same x and w, at other coordinates).
  const fused::TmaMaps* tma_maps(Fused kind, const FusedParams& p, const at::Tensor& x,
                                 const at::Tensor& w) {
    if (kind != Fused::kSm90 || !p.tma) return nullptr;
    if (maps_state_ == 0) {
      using Cfg = tiles::Sm90Config<cutlass::bfloat16_t>;  // the tile shape of both dtypes
      const auto t = x.scalar_type();
      const bool ok =
          encode_rows_map(&maps_.x, t, x.const_data_ptr(), p.n, p.d, Cfg::BM, Cfg::BK) &&
          encode_rows_map(&maps_.w, t, w.const_data_ptr(), w.size(0), p.d, Cfg::BN, Cfg::BK);
      maps_state_ = ok ? 1 : 2;
    }
    return maps_state_ == 1 ? &maps_ : nullptr;
  }
  fused::TmaMaps maps_{};
  int maps_state_ = 0;  // 0: not encoded yet, 1: maps_ holds them, 2: no encoder

  // A fused kernel with smem bytes of dynamic shared memory and its arguments (FusedArgs,
  // FusedParams and, for the TMA kernels, the TmaMaps).
  template <typename Kernel, typename... Args>
  static void launch_one(Kernel kernel, int smem, const Launch& l, const Args&... args) {
    {  // the shared-memory opt-in, once per kernel and device
      static std::mutex mu;
      static std::set<std::pair<const void*, int>> done;
      int dev = 0;
      C10_CUDA_CHECK(cudaGetDevice(&dev));
      std::lock_guard<std::mutex> lock(mu);
      const std::pair<const void*, int> key(reinterpret_cast<const void*>(kernel), dev);
      if (!done.count(key)) {
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        done.insert(key);  // only once it succeeded
      }
    }
    kernel<<<grid_of(l), l.threads, smem, stream()>>>(args...);
  }

  template <typename T>
  static void launch_typed(Fused kind, bool grad, const Launch& l, const fused::FusedArgs& a,
                           const FusedParams& p, const fused::TmaMaps* maps) {
    using namespace fused;
    if (kind == Fused::kSm90 && maps != nullptr) {
      constexpr int smem = smem_bytes<tiles::Sm90Config<T>>();
      if (grad) launch_one(grad_sm90_tma_kernel<T>, smem, l, a, p, *maps);
      else launch_one(fwd_sm90_tma_kernel<T>, smem, l, a, p, *maps);
    } else if (kind == Fused::kSm90) {
      constexpr int smem = smem_bytes<tiles::Sm90Config<T>>();
      if (grad) launch_one(grad_sm90_kernel<T>, smem, l, a, p);
      else launch_one(fwd_sm90_kernel<T>, smem, l, a, p);
    } else {
      constexpr int smem = smem_bytes<tiles::Sm80Config<T>>();
      if (grad) launch_one(grad_sm80_kernel<T>, smem, l, a, p);
      else launch_one(fwd_sm80_kernel<T>, smem, l, a, p);
    }
  }

  static void launch_fused(Fused kind, bool grad, at::ScalarType t, const Launch& l,
                           const fused::FusedArgs& a, const FusedParams& p,
                           const fused::TmaMaps* maps) {
    TORCH_CHECK(kind != Fused::kNone, "launch_fused: no fused kernels for this device");
    if (t == at::kBFloat16) launch_typed<cutlass::bfloat16_t>(kind, grad, l, a, p, maps);
    else if (t == at::kHalf) launch_typed<cutlass::half_t>(kind, grad, l, a, p, maps);
    else TORCH_CHECK(false, "launch_fused: float16 / bfloat16 only, got ", t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpp_fwd_cuda(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bias, double s,
    double m1, double m2, double m3, int64_t wrap_mode, int64_t grad_mode, bool normalize,
    int64_t sub_centers, double softcap, double interclass, double grad_filter,
    int64_t block) {
  c10::cuda::OptionalCUDAGuard guard;   // x on another device: the host code's checks say so
  if (x.is_cuda()) guard.set_device(x.device());
  CudaRunner run;
  return fwd_host(run, x, w, labels, index, bias, s, m1, m2, m3, wrap_mode, grad_mode,
                  normalize, sub_centers, softcap, interclass, grad_filter, block);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpp_bwd_cuda(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& g_p, const at::Tensor& g_t,
    const at::Tensor& g_s, double s, double m1, double m2, double m3, int64_t wrap_mode,
    int64_t grad_mode, bool normalize, int64_t sub_centers, double softcap,
    double interclass, double grad_filter, int64_t block) {
  c10::cuda::OptionalCUDAGuard guard;
  if (x.is_cuda()) guard.set_device(x.device());
  CudaRunner run;
  return bwd_host(run, x, w, labels, index, bias, lse, g_p, g_t, g_s, s, m1, m2, m3,
                  wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass,
                  grad_filter, block);
}

}  // namespace
}  // namespace arcface::cuda

TORCH_LIBRARY_IMPL(arcface_kernels, CUDA, m) {
  m.impl("cpp_fwd", &arcface::cuda::cpp_fwd_cuda);
  m.impl("cpp_bwd", &arcface::cuda::cpp_bwd_cuda);
}
