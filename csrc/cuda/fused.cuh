// The fused tensor-core kernels of the CUDA backend, on CuTe (tiles.h): the forward
// (logits -> online log-sum-exp partials, never stored) and the backward's G kernel
// (logits recomputed -> G = dL/dc written to the bounded workspace), for float16 /
// bfloat16 with K = 1 and no bias / softcap / interclass filter (the common case; the
// host picks these kernels then, and the general kernels of arcface_cuda.cu otherwise).
//
// One driver (`run_tiles`) for both tensor-core generations:
//   * a CTA owns BM rows of x and a contiguous range of class tiles (BN classes each);
//   * the (class tile, k tile) iterations are one flattened cp.async pipeline of STAGES
//     shared-memory stages, so the loads of the next class tile are in flight while the
//     epilogue of the current one runs;
//   * operand tiles arrive in one of two ways (a Loader, below): by TMA on sm_90a when
//     the rows of w are contiguous (no Partial FC index: the x and w tiles are boxes of
//     two tensor maps, zero-filled past the tensors' edges, one thread issuing them and
//     an mbarrier per stage counting their bytes), else in 16-byte cp.async chunks
//     (zero-filled past the rows / classes / features) that gather the rows of w through
//     the index (a tile of gathered rows is not a box of a tensor map: TMA's row gather
//     is an sm_100 feature), the same code for sm_80 and sm_90a;
//   * Sm80Config: ldmatrix + mma.sync per 16-wide k block; Sm90Config: wgmma reading both
//     operands from the swizzled shared memory (one batch per k tile, fp32 accumulators);
//   * the epilogue works on the accumulator registers (tiles.h acc_rowcol): each row of
//     the tile lives in one quad, so per-row state needs only register loops and, once per
//     CTA, two shuffles.
// The per-element math is arcface_math.h (cosine, psi, grad_target, grad_nontarget,
// Lse), shared with the CPU kernel and the general CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda.h>  // CUtensorMap (the TMA descriptors)
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../arcface_math.h"
#include "host.h"
#include "tiles.h"

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

namespace arcface::cuda::fused {

using namespace cute;

// The fused kernels need cp.async (sm_80); wgmma needs the arch-specific sm_90a target.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define AK_FUSED_SM80 1
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define AK_FUSED_SM90 1
#endif

// Inputs of the epilogues, by value.
struct FusedArgs {
  const void* x;
  const void* w;
  const int64_t* labels;
  const int64_t* idx;      // Partial FC index (shard position -> class) or nullptr
  const float* anorm;      // [n] inverse norms of x (1 without normalization)
  const float* bnorm;      // [shard] inverse norms of the shard's rows of w
  const int* unsafe;       // set by the inverse-norm kernels: some norm is above 2^63
  // forward
  float* target;           // [n]
  float* part_m;           // [splits, n] each: running max, sum of exp, sum of z,
  float* part_s;           //   best cosine and its class
  float* part_z;
  float* part_b;
  int64_t* part_a;
  // backward
  const float* lse;        // [n] and the three upstream gradients
  const float* gp;
  const float* gt;
  const float* gs;
  void* g;                 // [n, ldg] G workspace (the chunk's classes j_begin..)
};

// The TMA kernels' tensor maps (host-encoded, passed as a __grid_constant__ argument):
// x [n, d] in boxes of BM rows x BK features, w [rows of w, d] in boxes of BN rows x BK,
// both with the 128-byte swizzle of the GMMA K-major SW128 layouts (tiles.h; checked by
// the layout test) and zero fill past the tensors' edges.
struct TmaMaps {
  CUtensorMap x;
  CUtensorMap w;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte cp.async, zero-filled (nothing read) when !pred.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
#if defined(AK_FUSED_SM80)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(pred ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(AK_FUSED_SM80)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait_n() {
#if defined(AK_FUSED_SM80)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Row of w of shard position j (K == 1).
__device__ __forceinline__ int64_t class_row(const int64_t* idx, int64_t j) {
  return idx ? idx[j] : j;
}

// The copy of one stage's operand tiles: thread tid copies the 16-byte chunk kc of rows
// tid / CPR + q * RPP (q < passes) of the x tile and of the w tile. Its shared-memory
// addresses are one base plus compile-time steps: moving q rows by RPP (a multiple of the
// 8-row swizzle atom) or a stage adds a constant (checked by the layout test), so a copy
// costs an address add, a predicate and the cp.async.
template <class Cfg>
struct Loader {
  using T = typename Cfg::Element;
  static constexpr int CPR = Cfg::BK / 8;        // 16-byte chunks per row of a k tile
  static constexpr int RPP = Cfg::THREADS / CPR; // rows per pass
  static constexpr int PA = Cfg::BM / RPP, PB = Cfg::BN / RPP;
  static_assert(Cfg::BM % RPP == 0 && Cfg::BN % RPP == 0 && RPP % 8 == 0, "whole passes");
  static constexpr uint32_t kPassBytes = RPP * Cfg::BK * sizeof(T);
  static constexpr uint32_t kStageA = Cfg::BM * Cfg::BK * sizeof(T);
  static constexpr uint32_t kStageB = Cfg::BN * Cfg::BK * sizeof(T);

  const T* x0;         // x + (this thread's first row) * d + kc * 8 (x itself past n)
  int64_t xstep;       // RPP * d
  uint32_t sa0, sb0;   // shared addresses of the thread's chunk, q = 0, stage 0
  int a_rows;          // passes whose x row is < n
  int wrow[PB];        // rows of w of this thread's classes of the tile (-1: none)
  int wnext[PB];       // the same for the next tile the copies enter
  int kc, r;

  __device__ void init(const T* x, const FusedParams& p, int64_t r0, int tid, T* sA, T* sB) {
    kc = tid % CPR;
    r = tid / CPR;
    const int64_t first = r0 + r;
    x0 = x + (first < p.n ? first * p.d + kc * 8 : 0);
    xstep = (int64_t)RPP * p.d;
    const int64_t left = p.n - first;  // rows of this thread at first, first + RPP, ...
    a_rows = left <= 0 ? 0 : (int)min<int64_t>(PA, (left + RPP - 1) / RPP);
    // (as tensors over the buffers address them: the GMMA layouts' swizzle is applied to
    // the pointer; the layout test checks these offsets against wgmma's and TMA's)
    sa0 = smem_addr(sA + tiles::smem_offset<typename Cfg::SmemLayoutA, T>(r, kc * 8, 0));
    sb0 = smem_addr(sB + tiles::smem_offset<typename Cfg::SmemLayoutB, T>(r, kc * 8, 0));
  }
  // The rows of w of class tile `tile` (classes j_begin + tile * BN ..; rows < 2^31)
  // into wnext; the copies take them over when they enter that tile (enter_tile).
  __device__ void prepare_tile(const int64_t* idx, const FusedParams& p, int64_t tile) {
    const int64_t j0 = p.j_begin + tile * Cfg::BN + r;
#pragma unroll
    for (int q = 0; q < PB; ++q) {
      const int64_t j = j0 + q * RPP;
      wnext[q] = j < p.j_end ? (int)class_row(idx, j) : -1;
    }
  }
  __device__ __forceinline__ void enter_tile() {
#pragma unroll
    for (int q = 0; q < PB; ++q) wrow[q] = wnext[q];
  }
  // Issue the copies of k tile kt (of the class tile the copies entered last) into stage
  // `stage`, as one commit group.
  __device__ void load(const T* x, const T* w, const FusedParams& p, int64_t /*tile*/,
                       int kt, int stage) {
    const int64_t k = (int64_t)kt * Cfg::BK;
    const bool kok = k + kc * 8 < p.d;  // d % 8 == 0: a chunk is all in or all out
    const uint32_t sa = sa0 + stage * kStageA, sb = sb0 + stage * kStageB;
    const T* xk = x0 + k;
#pragma unroll
    for (int q = 0; q < PA; ++q) {
      const bool ok = kok && q < a_rows;
      cp_async16(sa + q * kPassBytes, ok ? xk + q * xstep : x, ok);
    }
    const T* wk = w + kc * 8 + k;
#pragma unroll
    for (int q = 0; q < PB; ++q) {
      const bool ok = kok && wrow[q] >= 0;
      cp_async16(sb + q * kPassBytes, ok ? wk + (int64_t)wrow[q] * p.d : w, ok);
    }
  }
  // Close the group of the trip's copies (an empty group past the end keeps the wait
  // counts uniform).
  __device__ __forceinline__ void commit() { cp_async_commit(); }
  // Until the stage of the oldest outstanding group has landed: STAGES - 2 groups may
  // stay in flight. The caller's barrier then makes them visible to every thread.
  __device__ __forceinline__ void wait(int /*stage*/) {
    cp_async_wait_n<Cfg::STAGES - 2>();
#if defined(AK_FUSED_SM90)
    if constexpr (Cfg::THREADS == 256) {
      // the cp.async writes (generic proxy) become visible to wgmma (async proxy)
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
#endif
  }
  __device__ __forceinline__ void drain() { cp_async_wait_n<0>(); }
};

// The copies by TMA (sm_90a, rows of w contiguous: no index): thread 0 issues the two
// boxes of a stage (x rows r0.., features k..; w rows j_begin + tile BN.., features k..)
// on the stage's mbarrier, armed with the stage's byte count; every thread waits on that
// barrier's phase before reading the stage. Boxes past the tensors' edges are zero-filled
// (and still count their full bytes), as the cp.async copies zero-fill.
template <class Cfg>
struct TmaLoader {
  using T = typename Cfg::Element;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  static constexpr int kStageA = Cfg::BM * Cfg::BK, kStageB = Cfg::BN * Cfg::BK;  // elements
  static constexpr uint32_t kStageBytes = (kStageA + kStageB) * sizeof(T);
  const CUtensorMap* mx;
  const CUtensorMap* mw;
  T* sa;
  T* sb;
  uint64_t* full;   // [STAGES] mbarriers: stage s holds k tile data once its phase flips
  uint32_t phases;  // bit s: the parity of stage s's next phase to wait for
  int row0;         // the CTA's first row of x
  int64_t col0;     // the launch's first row of w (j_begin)

  // Every thread; the barriers are initialized and visible when it returns.
  __device__ void init(const TmaMaps& m, const FusedParams& p, int64_t r0, T* sA, T* sB,
                       uint64_t* bars) {
    mx = &m.x;
    mw = &m.w;
    sa = sA;
    sb = sB;
    full = bars;
    phases = 0;
    row0 = (int)r0;
    col0 = p.j_begin;
#if defined(AK_FUSED_SM90)
    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(mx);
      cute::prefetch_tma_descriptor(mw);
#pragma unroll
      for (int s = 0; s < Cfg::STAGES; ++s) Barrier::init(&full[s], 1);
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();
#endif
  }
  __device__ __forceinline__ void prepare_tile(const int64_t*, const FusedParams&, int64_t) {}
  __device__ __forceinline__ void enter_tile() {}
  __device__ __forceinline__ void load(const T*, const T*, const FusedParams&, int64_t tile,
                                       int kt, int stage) {
#if defined(AK_FUSED_SM90)
    if (threadIdx.x == 0) {
      uint64_t* bar = &full[stage];
      Barrier::arrive_and_expect_tx(bar, kStageBytes);
      constexpr uint64_t hint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
      const int k = kt * Cfg::BK;
      SM90_TMA_LOAD_2D::copy(mx, bar, hint, sa + stage * kStageA, k, row0);
      SM90_TMA_LOAD_2D::copy(mw, bar, hint, sb + stage * kStageB, k,
                             (int)(col0 + tile * Cfg::BN));
    }
#endif
  }
  __device__ __forceinline__ void commit() {}
  __device__ __forceinline__ void wait(int stage) {
#if defined(AK_FUSED_SM90)
    Barrier::wait(&full[stage], (phases >> stage) & 1u);
    phases ^= 1u << stage;
#endif
  }
  __device__ __forceinline__ void drain() {}  // every box issued was waited for
};

template <class Cfg>
struct SharedStorage {
  using T = typename Cfg::Element;
  alignas(128) T a[cosize_v<typename Cfg::SmemLayoutA>];
  alignas(128) T b[cosize_v<typename Cfg::SmemLayoutB>];
  // per column of the class tiles (by tile parity): (inverse norm, the epilogue's column
  // value: Epi::col_value), or (0, Epi::col_value past the classes) past the launch's
  // classes
  float2 bcol[2][Cfg::BN];
  // the TMA pipeline's barriers, one per stage (unused by the cp.async copies)
  alignas(8) uint64_t full[Cfg::STAGES];
};

template <class Cfg>
constexpr int smem_bytes() {
  return (int)sizeof(SharedStorage<Cfg>);
}

// ---------------------------------------------------------------- tensor-core k tiles
// acc += A(stage) B(stage)^T over one k tile.
template <class Cfg, class Acc>
__device__ __forceinline__ void mma_k_tile(Acc& acc, typename Cfg::Element* sA,
                                           typename Cfg::Element* sB, int stage,
                                           bool first_k) {
  typename Cfg::TiledMma mma;
  auto thr = mma.get_thread_slice(threadIdx.x);
  Tensor tsA = make_tensor(make_smem_ptr(sA), typename Cfg::SmemLayoutA{});
  Tensor tsB = make_tensor(make_smem_ptr(sB), typename Cfg::SmemLayoutB{});
  if constexpr (Cfg::THREADS == 256) {  // Sm90Config: wgmma from shared memory
#if defined(AK_FUSED_SM90)
    Tensor tCsA = thr.partition_A(tsA);  // (MMA, MMA_M, MMA_K, STAGES)
    Tensor tCsB = thr.partition_B(tsB);
    Tensor tCrA = thr.make_fragment_A(tCsA);  // descriptors
    Tensor tCrB = thr.make_fragment_B(tCsB);
    mma.accumulate_ = first_k ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tCrA); ++kb) {
      cute::gemm(mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), acc);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
#endif
  } else {  // Sm80Config: ldmatrix + mma.sync
#if defined(AK_FUSED_SM80)
    if (first_k) clear(acc);
    Tensor tCrA = thr.partition_fragment_A(tsA(_, _, 0));  // (MMA, MMA_M, MMA_K)
    Tensor tCrB = thr.partition_fragment_B(tsB(_, _, 0));
    auto s2r_a = make_tiled_copy_A(typename Cfg::LdsmA{}, mma);
    auto s2r_b = make_tiled_copy_B(typename Cfg::LdsmB{}, mma);
    auto ta = s2r_a.get_thread_slice(threadIdx.x);
    auto tb = s2r_b.get_thread_slice(threadIdx.x);
    Tensor tXsA = ta.partition_S(tsA);  // (CPY, MMA_M, MMA_K, STAGES)
    Tensor tXsB = tb.partition_S(tsB);
    Tensor tXrA = ta.retile_D(tCrA);
    Tensor tXrB = tb.retile_D(tCrB);
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tCrA); ++kb) {
      copy(s2r_a, tXsA(_, _, kb, stage), tXrA(_, _, kb));
      copy(s2r_b, tXsB(_, _, kb, stage), tXrB(_, _, kb));
      cute::gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
    }
#endif
  }
}

// ---------------------------------------------------------------- the driver
// For each class tile of the CTA's range: acc = x_tile . w_tile^T over all k tiles, then
// epi.tile(acc, j0) with the tile's first class; epi.finish() at the end. The operand
// tiles of the next class tile are loaded while the epilogue runs. `ld` (Loader: cp.async,
// TmaLoader: TMA) is initialized by the caller.
template <class Cfg, class Epi, class Ld>
__device__ __forceinline__ void run_tiles(const FusedArgs& a, const FusedParams& p, Epi& epi,
                                          Ld& ld, SharedStorage<Cfg>& sm) {
  using T = typename Cfg::Element;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  const int64_t t_begin = (int64_t)blockIdx.y * p.tiles_per_split;
  const int64_t t_end = min(p.tiles, t_begin + p.tiles_per_split);
  const int kt_count = (int)((p.d + Cfg::BK - 1) / Cfg::BK);
  const int64_t total = (t_end - t_begin) * kt_count;  // (tile, k tile) iterations

  // the load cursor: (tile, k tile) of the next iteration to load
  int64_t ld_tile = t_begin;
  int ld_kt = 0;
  int64_t ld_it = 0;
  // The copies run STAGES - 1 (k tile) iterations ahead, so they enter exactly one new
  // class tile per trip of the tile loop: its rows of w are looked up there (outside the
  // main loop, prepare_tile) and taken over here.
  auto issue = [&](int stage) {
    if (ld_it < total) {
      if (ld_kt == 0) ld.enter_tile();
      ld.load(x, w, p, ld_tile, ld_kt, stage);
      if (++ld_kt == kt_count) {
        ld_kt = 0;
        ++ld_tile;
      }
    }
    ++ld_it;
    ld.commit();
  };
  // the prologue's copies: they may enter up to STAGES - 1 tiles (one k tile each)
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (ld_kt == 0 && ld_tile < t_end) ld.prepare_tile(a.idx, p, ld_tile);
    issue(s);
  }

  typename Cfg::TiledMma mma;
  Tensor acc = partition_fragment_C(mma, Shape<Int<Cfg::BM>, Int<Cfg::BN>>{});
  // The column norms of class tile t go to sm.bcol[t & 1]: loaded into a register before
  // tile t - 1's main loop, stored after it (a barrier of tile t's main loop separates
  // the store from the epilogue's reads, and every thread has left tile t - 2's epilogue,
  // the last reader of that buffer, before tile t - 1's first barrier).
  const int bc = threadIdx.x;  // the column this thread stages (BN <= THREADS)
  static_assert(Cfg::BN <= Cfg::THREADS, "one column per thread");
  auto col_norm = [&](int64_t t) {
    const int64_t j = p.j_begin + t * Cfg::BN + bc;
    const bool ok = bc < Cfg::BN && t < t_end && j < p.j_end;
    const float b = ok ? a.bnorm[j] : 0.f;
    return make_float2(b, epi.col_value(b, ok));
  };
  if (bc < Cfg::BN) sm.bcol[0][bc] = col_norm(t_begin);
  int stage = 0;
  for (int64_t tile = t_begin; tile < t_end; ++tile) {  // the tile loop
    const float2 next_b = col_norm(tile + 1);
    // the tile the copies enter during this trip (ld_kt == 0: at its first issue)
    const int64_t enter = ld_kt == 0 ? ld_tile : ld_tile + 1;
    if (enter < t_end) ld.prepare_tile(a.idx, p, enter);
    for (int kt = 0; kt < kt_count; ++kt) {  // the main loop (one k tile per trip)
      ld.wait(stage);
      // every thread is past the last trip's k tile (its tensor-core reads are complete):
      // that stage may be refilled
      __syncthreads();
      issue(stage == 0 ? Cfg::STAGES - 1 : stage - 1);  // the stage consumed last trip
      mma_k_tile<Cfg>(acc, sm.a, sm.b, stage, kt == 0);
      if (++stage == Cfg::STAGES) stage = 0;
    }
    if (bc < Cfg::BN) sm.bcol[(tile + 1 - t_begin) & 1][bc] = next_b;
    epi.tile(acc, p.j_begin + tile * Cfg::BN, sm.bcol[(tile - t_begin) & 1]);
  }
  ld.drain();
  epi.finish();
}

// ---------------------------------------------------------------- epilogues
// The thread's rows and columns of the tile: acc_coords (tiles.h) is a runtime base (the
// thread's first element) plus compile-time offsets, so row(i) / col(c) fold to a base
// plus a constant in the unrolled loops.
template <class Cfg>
struct Coords {
  using Crd = decltype(tiles::acc_coords<Cfg>(0));
  static constexpr int R = decltype(size<0>(std::declval<Crd>()))::value;
  static constexpr int C = decltype(size<1>(std::declval<Crd>()))::value;
  Crd crd;
  int col0;  // the thread's first column
  __device__ Coords() : crd(tiles::acc_coords<Cfg>(threadIdx.x)) { col0 = col(0); }
  __device__ __forceinline__ int row(int i) const { return get<0>(crd(i, 0)); }
  __device__ __forceinline__ int col(int c) const { return get<1>(crd(0, c)); }
  // col(c) - col0: a compile-time constant once the loops are unrolled (tiles.h: the
  // same offsets for every thread, checked by the layout test)
  __device__ __forceinline__ int off(int c) const { return col(c) - col0; }
};

template <class Acc>
__device__ __forceinline__ auto rowcol(Acc& acc) {
  return make_tensor(acc.data(), tiles::acc_rowcol(acc.layout()));
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^v by the SFU (MUFU.EX2, relative error about 2^-22; results below 2^-126 flush to 0,
// which the sums here cannot see next to their largest term, 1): one instruction where
// exp2f adds a denormal fix-up around it.
__device__ __forceinline__ float ex2(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

// arcface_math.h cosine() with its bounds hoisted out of the element loops (lo, hi = -1, 1
// when normalizing, else -inf, inf): two NaN-propagating min / max (sm_80's max.NaN).
struct CosBounds {
  float lo, hi;
  __device__ explicit CosBounds(bool normalize)
      : lo(normalize ? -1.f : -INFINITY), hi(normalize ? 1.f : INFINITY) {}
  __device__ __forceinline__ float operator()(float dot) const {
#if defined(AK_FUSED_SM80)
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(dot), "f"(lo));
    asm("min.NaN.f32 %0, %0, %1;" : "+f"(r) : "f"(hi));
    return r;
#else
    return dot > hi ? hi : (dot < lo ? lo : dot);
#endif
  }
};

// Whether offset t (from the thread's first column) is one of the thread's columns.
template <int C, class XY>
__device__ __forceinline__ bool holds(const XY& xy, int t) {
  bool h = false;
#pragma unroll
  for (int c = 0; c < C; ++c) h |= xy.off(c) == t;
  return h;
}

// The label's column in the tile starting at class j0 (-1: not among its `valid` columns).
__device__ __forceinline__ int tile_label(int64_t label, int64_t j0, int valid) {
  const int64_t t = label - j0;
  return t >= 0 && t < valid ? (int)t : -1;
}

// What both epilogues hold of the thread's rows: their inverse norms and labels (rows past
// n: 0 and -1), and which tile columns are the thread's.
template <class Cfg>
struct EpilogueRows {
  static constexpr int R = Coords<Cfg>::R, C = Coords<Cfg>::C;
  const FusedArgs& a;
  const FusedParams& p;
  Coords<Cfg> xy;
  int64_t r0;
  float ai[R];
  int64_t li[R];

  __device__ EpilogueRows(const FusedArgs& a_, const FusedParams& p_) : a(a_), p(p_) {
    r0 = (int64_t)blockIdx.x * Cfg::BM;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t gi = r0 + xy.row(i);
      const bool ok = gi < p.n;
      ai[i] = ok ? a.anorm[gi] : 0.f;
      li[i] = ok ? a.labels[gi] : -1;
    }
  }
  // Whether the column at offset t from the thread's first is one of its columns.
  __device__ __forceinline__ bool held(int t) const { return holds<C>(xy, t); }
};

// The forward: per row, an online log-sum-exp of z = s c (s psi(c) at the target), the
// sum of z, and the best cosine with its class; written per (split, row) at the end.
// Per element: the cosine, the argmax candidate, z, the tile max; per row and tile: the
// sum of exp, the merge, and the target (whose z = s psi(c) is pushed separately: psi is
// evaluated once per row, not per element).
template <class Cfg>
struct FwdEpilogue : EpilogueRows<Cfg> {
  using Base = EpilogueRows<Cfg>;
  using Base::R, Base::C, Base::a, Base::p, Base::xy, Base::r0, Base::ai, Base::li,
      Base::held;
  float m[R], se[R], sz[R], best[R];
  int barg[R];  // class (shard position) of best, INT_MAX: none yet

  __device__ FwdEpilogue(const FusedArgs& a_, const FusedParams& p_) : Base(a_, p_) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      m[i] = -INFINITY;
      se[i] = 0.f;
      sz[i] = 0.f;
      best[i] = -INFINITY;
      barg[i] = std::numeric_limits<int>::max();
    }
  }

  // The column value staged beside b (bcol .y): the logit mask, 0 or -inf past the classes.
  __device__ __forceinline__ float col_value(float, bool ok) const {
    return ok ? 0.f : -INFINITY;
  }

  template <class Acc>
  __device__ __forceinline__ void tile(Acc& acc_in, int64_t j0, const float2* bcol) {
    Tensor acc = rowcol(acc_in);
    const Margin<float>& mp = p.mp;
    const int valid = (int)min<int64_t>(Cfg::BN, p.j_end - j0);
    const int jc0 = (int)j0 + xy.col0;  // class of the thread's first column (< 2^31)
    const float2* bc = bcol + xy.col0;  // (b, mask) of the thread's columns by offset
    int trel[R];
    float tm[R], ct[R], tcs[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      // the label's column as an offset from the thread's first (-1 - col0: none)
      trel[i] = tile_label(li[i], j0, valid) - xy.col0;
      tm[i] = -INFINITY;
      ct[i] = 0.f;
      tcs[i] = 0.f;
    }
    const CosBounds cosine(mp.normalize);
    const float s = mp.s;
#pragma unroll
    for (int c = 0; c < C; ++c) {  // one column at a time: (b, mask) is loaded once
      const int o = xy.off(c);
      const float2 bm = bc[o];  // past the classes: b = 0 (and acc = 0: c = 0), mask -inf
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const float cs = cosine(acc(i, c) * ai[i] * bm.x);
        // the argmax over the thread's columns, visited in increasing class order:
        // better_max reduces to "not <=" (a NaN candidate wins) and "best not NaN"
        const float key = bm.y == 0.f ? cs : -INFINITY;  // a select: cs may be NaN there
        if (!(key <= best[i]) && best[i] == best[i]) {
          best[i] = key;
          barg[i] = jc0 + o;
        }
        const bool is_t = o == trel[i];
        ct[i] = is_t ? cs : ct[i];
        tcs[i] += cs;  // sum of z = s (sum of c - c_target) + z_target, below
        const float z = is_t ? -INFINITY : fmaf(s, cs, bm.y);  // the target: pushed below
        acc(i, c) = z;
        tm[i] = fmaxf(tm[i], z);  // drops a NaN: the sum below keeps it
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      // the tile's partial state (tm, ts); -inf logits add nothing (also when all are)
      const float off = -(tm[i] == -INFINITY ? 0.f : tm[i]) * kLog2e;
      float ts = 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) ts += ex2(fmaf(acc(i, c), kLog2e, off));
      Lse<float> st =
          lse_merge(Lse<float>{m[i], se[i]}, Lse<float>{ts != ts ? ts : tm[i], ts});
      sz[i] += s * (tcs[i] - ct[i]);  // ct = 0 unless this thread holds the target
      if (held(trel[i])) {  // this thread holds the row's target column
        const float zt = mp.s * psi(ct[i], mp);
        a.target[r0 + xy.row(i)] = zt;
        lse_push(st, zt);
        sz[i] += zt;
      }
      m[i] = st.m;
      se[i] = st.sum;
    }
  }

  __device__ void finish() {
    // merge the quad's four partial states of each row (fixed order: xor 1, then xor 2)
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m[i], o);
        const float os = __shfl_xor_sync(0xffffffffu, se[i], o);
        const float oz = __shfl_xor_sync(0xffffffffu, sz[i], o);
        const float ob = __shfl_xor_sync(0xffffffffu, best[i], o);
        const int oa = __shfl_xor_sync(0xffffffffu, barg[i], o);
        const Lse<float> l = lse_merge(Lse<float>{m[i], se[i]}, Lse<float>{om, os});
        m[i] = l.m;
        se[i] = l.sum;
        sz[i] += oz;
        // better_max keeps a NaN; with NaN on both take the first class (CPU rule)
        if (better_max(ob, (int64_t)oa, best[i], (int64_t)barg[i]) ||
            (ob != ob && best[i] != best[i] && oa < barg[i])) {
          best[i] = ob;
          barg[i] = oa;
        }
      }
      const int64_t gi = r0 + xy.row(i);
      if ((threadIdx.x & 3) == 0 && gi < p.n) {
        const int64_t o = (int64_t)blockIdx.y * p.n + gi;
        a.part_m[o] = m[i];
        a.part_s[o] = se[i];
        a.part_z[o] = sz[i];
        a.part_b[o] = best[i];
        a.part_a[o] = barg[i] == std::numeric_limits<int>::max()
                          ? std::numeric_limits<int64_t>::max()
                          : (int64_t)barg[i];
      }
    }
  }
};

// Two adjacent G values as one 4-byte store.
__device__ __forceinline__ void store_pair(cutlass::bfloat16_t* dst, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
}
__device__ __forceinline__ void store_pair(cutlass::half_t* dst, float v0, float v1) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(v0, v1);
}

// The backward: G_ij = dL/dc_ij into the workspace (column j - j_begin), in T, or with
// p.fold_b G_ij b_j (b_j: the column's inverse norm; the host's products then take the
// raw rows of w, no normalized copy). Per element the non-target formula; the target
// element is rewritten once per row with grad_target (psi and psi' evaluated once per
// row, not per element).
template <class Cfg>
struct GradEpilogue : EpilogueRows<Cfg> {
  using T = typename Cfg::Element;
  using Base = EpilogueRows<Cfg>;
  using Base::R, Base::C, Base::a, Base::p, Base::xy, Base::r0, Base::ai, Base::li,
      Base::held;
  static_assert(C % 2 == 0, "column pairs");
  float lse2[R], gp[R], gs[R];  // lse2 = lse log2(e)

  __device__ GradEpilogue(const FusedArgs& a_, const FusedParams& p_) : Base(a_, p_) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t gi = r0 + xy.row(i);
      const bool ok = gi < p.n;
      lse2[i] = ok ? a.lse[gi] * kLog2e : 0.f;
      gp[i] = ok ? a.gp[gi] : 0.f;
      gs[i] = ok ? a.gs[gi] : 0.f;
    }
  }

  // The column value staged beside b (bcol .y): the factor of G's non-target formula,
  // s, or s b with fold_b (0 past the classes: those G values are never read).
  __device__ __forceinline__ float col_value(float b, bool ok) const {
    return ok ? (p.fold_b ? p.mp.s * b : p.mp.s) : 0.f;
  }

  template <class Acc>
  __device__ __forceinline__ void tile(Acc& acc_in, int64_t j0, const float2* bcol) {
    Tensor acc = rowcol(acc_in);
    const Margin<float>& mp = p.mp;
    const int valid = (int)min<int64_t>(Cfg::BN, p.j_end - j0);
    T* g = static_cast<T*>(a.g) + (j0 - p.j_begin);  // column 0 of the tile
    const float s2 = mp.s * kLog2e;
    const int vrel = valid - xy.col0;  // valid columns: offsets < vrel
    const float2* bc = bcol + xy.col0;
    const CosBounds cosine(mp.normalize);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t gi = r0 + xy.row(i);
      if (gi >= p.n) continue;
      const int trel = tile_label(li[i], j0, valid) - xy.col0;
      float ct = 0.f;
      T* grow = g + gi * p.ldg + xy.col0;
#pragma unroll
      for (int c = 0; c < C; c += 2) {  // columns at offsets o, o + 1
        const int o = xy.off(c);
        const float c0 = cosine(acc(i, c) * ai[i] * bc[o].x);
        const float c1 = cosine(acc(i, c + 1) * ai[i] * bc[o + 1].x);
        ct = o == trel ? c0 : (o + 1 == trel ? c1 : ct);
        // G = s (g_p exp(s c - lse) + g_s) (arcface_math.h grad_nontarget), exp as exp2,
        // times b with fold_b (the staged factor)
        const float v0 = bc[o].y * fmaf(gp[i], ex2(fmaf(s2, c0, -lse2[i])), gs[i]);
        const float v1 = bc[o + 1].y * fmaf(gp[i], ex2(fmaf(s2, c1, -lse2[i])), gs[i]);
        // one store per pair: where only o is valid, o + 1 is a padding column of the
        // workspace (its leading dimension is the chunk's classes rounded up to 8)
        if (o < vrel) store_pair(grow + o, v0, v1);
      }
      if (held(trel)) {  // the target: overwritten (program order) with its formula
        const float gt = grad_target(ct, a.lse[gi], gp[i], a.gt[gi], gs[i], mp);
        grow[trel] = T(p.fold_b ? gt * bc[trel].x : gt);
      }
    }
  }

  __device__ void finish() {}
};

// ---------------------------------------------------------------- slow paths
__device__ __forceinline__ float elem_f(float v) { return v; }
__device__ __forceinline__ float elem_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float elem_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float elem_f(cutlass::half_t v) { return float(v); }
__device__ __forceinline__ float elem_f(cutlass::bfloat16_t v) { return float(v); }

// The cosine from the normalized elements (x_k a) (w_k b), summed in fp32: no partial sum
// can overflow, whatever the norms (NaN and inf inputs still give NaN).
template <typename T>
__device__ __forceinline__ float safe_dot(const T* x, const T* w, int64_t d, float a, float b) {
  float acc = 0.f;
  for (int64_t k = 0; k < d; ++k) acc = fmaf(elem_f(x[k]) * a, elem_f(w[k]) * b, acc);
  return acc;
}

// When the inverse-norm kernels flagged a norm above 2^63 (FusedArgs::unsafe), every CTA
// computes its part with safe_dot instead of the tensor cores: one row per thread, the
// CTA's classes in order. Correct for any finite input, and slow: it is only taken for
// rows of extreme norm. Its results match the fast path's (same per-element math, same
// per-(split, row) partial states and tie rules).
template <class Cfg, bool kGrad>
__device__ void slow_path(const FusedArgs& a, const FusedParams& p) {
  using T = typename Cfg::Element;
  const int64_t r0 = (int64_t)blockIdx.x * Cfg::BM;
  const int64_t jb = p.j_begin + (int64_t)blockIdx.y * p.tiles_per_split * Cfg::BN;
  const int64_t je = min(p.j_end, jb + p.tiles_per_split * Cfg::BN);
  for (int r = threadIdx.x; r < Cfg::BM; r += Cfg::THREADS) {  // @trips[0] (never on sane norms)
    const int64_t gi = r0 + r;
    if (gi >= p.n) break;
    const T* x = static_cast<const T*>(a.x) + gi * p.d;
    const float ai = a.anorm[gi];
    const int64_t li = a.labels[gi];
    Lse<float> st = lse_empty<float>();
    float sz = 0.f, best = -INFINITY;
    int64_t barg = std::numeric_limits<int64_t>::max();
    for (int64_t j = jb; j < je; ++j) {  // @trips[0]
      const T* w = static_cast<const T*>(a.w) + class_row(a.idx, j) * p.d;
      const float cs = cosine(safe_dot(x, w, p.d, ai, a.bnorm[j]), p.mp.normalize);
      if constexpr (kGrad) {  // G (times b with fold_b) into the workspace (column j - j_begin)
        const float g = j == li ? grad_target(cs, a.lse[gi], a.gp[gi], a.gt[gi], a.gs[gi], p.mp)
                                : grad_nontarget(p.mp.s * cs, a.lse[gi], a.gp[gi], a.gs[gi],
                                                 p.mp.s);
        static_cast<T*>(a.g)[gi * p.ldg + (j - p.j_begin)] = T(p.fold_b ? g * a.bnorm[j] : g);
      } else {  // the forward's state, as FwdEpilogue keeps it
        if (better_max(cs, j, best, barg)) {
          best = cs;
          barg = j;
        }
        float z = p.mp.s * cs;
        if (j == li) {
          z = p.mp.s * psi(cs, p.mp);
          a.target[gi] = z;
        }
        sz += z;
        lse_push(st, z);
      }
    }
    if constexpr (!kGrad) {
      const int64_t o = (int64_t)blockIdx.y * p.n + gi;
      a.part_m[o] = st.m;
      a.part_s[o] = st.sum;
      a.part_z[o] = sz;
      a.part_b[o] = best;
      a.part_a[o] = barg;
    }
  }
}

// ---------------------------------------------------------------- the kernels
// Grid (row tiles, class splits), Cfg::THREADS threads, smem_bytes<Cfg>() dynamic shared
// memory. Compiled to a trap where the architecture lacks the instructions (the host
// launches the sm80 kernels on sm_80+ and the sm90 ones on sm_90a only).
static_assert(tiles::Sm80Config<cutlass::bfloat16_t>::BM == FUSED80_BM &&
              tiles::Sm80Config<cutlass::bfloat16_t>::BN == FUSED80_BN &&
              tiles::Sm80Config<cutlass::bfloat16_t>::THREADS == FUSED80_THREADS &&
              tiles::Sm90Config<cutlass::bfloat16_t>::BM == FUSED90_BM &&
              tiles::Sm90Config<cutlass::bfloat16_t>::BN == FUSED90_BN &&
              tiles::Sm90Config<cutlass::bfloat16_t>::THREADS == FUSED90_THREADS,
              "host.h's fused tile constants");
static_assert(smem_bytes<tiles::Sm80Config<cutlass::bfloat16_t>>() == FUSED80_SMEM &&
                  smem_bytes<tiles::Sm90Config<cutlass::bfloat16_t>>() == FUSED90_SMEM,
              "host.h's fused shared-memory sizes");

// One kernel body: the overflow-free path when the inverse-norm kernels flagged a norm
// above 2^63, else the tensor-core tiles with the forward's or the backward's epilogue.
// The operand tiles come by TMA with kTma (the *_tma kernels: `maps`), else by cp.async.
template <class Cfg, bool kGrad, bool kTma = false>
__device__ __forceinline__ void fused_body(const FusedArgs& a, const FusedParams& p,
                                           const TmaMaps* maps = nullptr) {
  if (*a.unsafe) {
    slow_path<Cfg, kGrad>(a, p);
    return;
  }
  // dynamic shared memory starts 1024-byte aligned: the 128-byte swizzle's period (what
  // the swizzled layouts, wgmma's descriptors and TMA's boxes assume)
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sm = *reinterpret_cast<SharedStorage<Cfg>*>(smem_raw);
  using Epi = std::conditional_t<kGrad, GradEpilogue<Cfg>, FwdEpilogue<Cfg>>;
  Epi epi(a, p);
  const int64_t r0 = (int64_t)blockIdx.x * Cfg::BM;
  if constexpr (kTma) {
    TmaLoader<Cfg> ld;
    ld.init(*maps, p, r0, sm.a, sm.b, sm.full);
    run_tiles<Cfg>(a, p, epi, ld, sm);
  } else {
    Loader<Cfg> ld;
    ld.init(static_cast<const typename Cfg::Element*>(a.x), p, r0, threadIdx.x, sm.a, sm.b);
    run_tiles<Cfg>(a, p, epi, ld, sm);
  }
}

// The six kernels (the static report finds each by name). AK_FUSED_SM80 / _SM90 false:
// compiled to a trap (the host never launches them there).
#if defined(AK_FUSED_SM80)
#define AK_FUSED_BODY80(kGrad) fused_body<tiles::Sm80Config<T>, kGrad>(a, p)
#else
#define AK_FUSED_BODY80(kGrad) __trap()
#endif
#if defined(AK_FUSED_SM90)
#define AK_FUSED_BODY90(kGrad) fused_body<tiles::Sm90Config<T>, kGrad>(a, p)
#define AK_FUSED_BODY90_TMA(kGrad) fused_body<tiles::Sm90Config<T>, kGrad, true>(a, p, &maps)
#else
#define AK_FUSED_BODY90(kGrad) __trap()
#define AK_FUSED_BODY90_TMA(kGrad) __trap()
#endif

// Whether the build holds sm_90a code for the device (host: cudaFuncGetAttributes, no
// sync): the probe has static shared memory only where the wgmma kernels are compiled in
// (a plain sm_90 cubin or compute_90 PTX JIT-compiled on the device has traps instead).
__global__ void sm90a_probe_kernel(int* out) {
#if defined(AK_FUSED_SM90)
  __shared__ int mark[64];
  mark[threadIdx.x % 64] = (int)threadIdx.x;
  __syncthreads();
  if (out) out[threadIdx.x] = mark[(threadIdx.x + 1) % 64];
#else
  if (out) out[threadIdx.x] = 0;
#endif
}
__global__ void sm90a_probe_twin_kernel(int* out) {
  if (out) out[threadIdx.x] = 0;
}

template <class T>
__global__ void __launch_bounds__(FUSED80_THREADS, 2) fwd_sm80_kernel(FusedArgs a, FusedParams p) {
  AK_FUSED_BODY80(false);
}
template <class T>
__global__ void __launch_bounds__(FUSED80_THREADS, 2) grad_sm80_kernel(FusedArgs a, FusedParams p) {
  AK_FUSED_BODY80(true);
}
template <class T>
__global__ void __launch_bounds__(FUSED90_THREADS, 2) fwd_sm90_kernel(FusedArgs a, FusedParams p) {
  AK_FUSED_BODY90(false);
}
template <class T>
__global__ void __launch_bounds__(FUSED90_THREADS, 2) grad_sm90_kernel(FusedArgs a, FusedParams p) {
  AK_FUSED_BODY90(true);
}
// sm_90a with the rows of w contiguous (no index): the operand tiles by TMA
template <class T>
__global__ void __launch_bounds__(FUSED90_THREADS, 2)
    fwd_sm90_tma_kernel(FusedArgs a, FusedParams p, const __grid_constant__ TmaMaps maps) {
  AK_FUSED_BODY90_TMA(false);
}
template <class T>
__global__ void __launch_bounds__(FUSED90_THREADS, 2)
    grad_sm90_tma_kernel(FusedArgs a, FusedParams p, const __grid_constant__ TmaMaps maps) {
  AK_FUSED_BODY90_TMA(true);
}

}  // namespace arcface::cuda::fused
