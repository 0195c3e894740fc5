// CuTe tile configurations of the fused CUDA kernels (fused.cuh): the tensor-core
// TiledMMA, the shared-memory layouts of the operand tiles and the map from accumulator
// registers to (row, column) of the tile. Host-compilable (no device code), so that the
// layout tests (tests/test_cute_layouts.py, csrc/cuda/layout_check.cpp) check exactly the
// layouts the kernels use.
//
// Two configurations, one per tensor-core generation:
//   * Sm80Config: mma.sync m16n8k16 (HMMA), operands from shared memory through ldmatrix
//     (LDSM), 4 warps along M: CTA tile 128 x 64 x 64 (rows of x, rows of w, features),
//     3-stage cp.async pipeline (72 KiB of shared memory: 2-3 CTAs per SM).
//   * Sm90Config: wgmma m64n128k16 (HGMMA), both operands read by the tensor cores from
//     shared memory (128-byte swizzle), 2 warpgroups along M: CTA tile 128 x 128 x 64,
//     3-stage cp.async pipeline (96 KiB: 2 CTAs per SM).
// In both, every row of the tile lives in the registers of one quad (4 lanes: lane ^ 1,
// lane ^ 2) of one warp, and a thread's accumulators of one row are one row of the
// row-column view below: the epilogue's per-row reductions are register loops plus two
// shuffles, with no shared-memory round trip of the logit tile (checked on the host by
// the layout test).
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

namespace arcface::cuda::tiles {

using namespace cute;

// The 16-bit element types the tensor-core kernels take (c10 / CUDA types have the same
// bits: the kernels reinterpret pointers).
template <typename T>
struct MmaOps;
template <>
struct MmaOps<cutlass::bfloat16_t> {
  using Sm80 = SM80_16x8x16_F32BF16BF16F32_TN;
  using Sm90 = SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
};
template <>
struct MmaOps<cutlass::half_t> {
  using Sm80 = SM80_16x8x16_F32F16F16F32_TN;
  using Sm90 = SM90_64x128x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>;
};

template <typename T>
struct Sm80Config {
  using Element = T;
  static constexpr int BM = 128, BN = 64, BK = 64, STAGES = 3, THREADS = 128;
  using TiledMma = decltype(make_tiled_mma(MMA_Atom<typename MmaOps<T>::Sm80>{},
                                           Layout<Shape<_4, _1, _1>>{},
                                           Tile<_64, _16, _16>{}));
  // 8 x 64 k-major atom, 128-byte rows, 3-bit swizzle of the 16-byte chunks (ldmatrix and
  // 16-byte cp.async without bank conflicts)
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{},
                                        Layout<Shape<_8, Int<BK>>, Stride<Int<BK>, _1>>{}));
  using SmemLayoutA = decltype(tile_to_shape(SmemAtom{},
                                             make_shape(Int<BM>{}, Int<BK>{}, Int<STAGES>{})));
  using SmemLayoutB = decltype(tile_to_shape(SmemAtom{},
                                             make_shape(Int<BN>{}, Int<BK>{}, Int<STAGES>{})));
  using LdsmA = Copy_Atom<SM75_U32x4_LDSM_N, T>;
  using LdsmB = Copy_Atom<SM75_U32x4_LDSM_N, T>;
};

template <typename T>
struct Sm90Config {
  using Element = T;
  static constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 256;
  using TiledMma = decltype(make_tiled_mma(typename MmaOps<T>::Sm90{},
                                           Layout<Shape<_2, _1, _1>>{}));
  using SmemLayoutA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                             make_shape(Int<BM>{}, Int<BK>{}, Int<STAGES>{})));
  using SmemLayoutB = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                             make_shape(Int<BN>{}, Int<BK>{}, Int<STAGES>{})));
};

// Element offset of (row, k, stage) in a shared-memory operand buffer of the layout, the
// way a tensor over a shared-memory pointer addresses it (the buffer 1024-byte aligned).
// For the GMMA layouts CuTe applies the swizzle to the pointer, so their bare layout
// function gives other offsets: the copies into the buffers (fused.cuh) and the layout
// test use this.
template <class Layout, class T>
CUTE_HOST_DEVICE int smem_offset(int r, int k, int s) {
  T* const base = reinterpret_cast<T*>(uintptr_t(1024));  // any 1024-byte aligned address
  auto t = make_tensor(make_smem_ptr(base), Layout{});
  return int(&t(r, k, s) - base);
}

// The accumulator layout of a thread, ((values), MMA_M, MMA_N), as a (rows, columns)
// layout: mode 0 enumerates the thread's rows, mode 1 its columns.
//   mma.sync m16n8: values (2 columns, 2 rows)            -> ((2, MMA_M), (2, MMA_N))
//   wgmma m64nN:    values (2 columns, 2 rows, N / 8)      -> ((2, MMA_M), ((2, N/8), MMA_N))
template <typename Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3, "accumulator layout (values, M, N)");
  static_assert(decltype(rank<0>(acc))::value == 3 || decltype(size<0>(acc))::value == 4,
                "mma.sync (4 values) or wgmma ((2, 2, N/8) values) accumulators");
  if constexpr (decltype(rank<0>(acc))::value == 3) {
    return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                       make_layout(make_layout(get<0, 0>(acc), get<0, 2>(acc)), get<2>(acc)));
  } else {
    auto l = logical_divide(acc, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
    return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                       make_layout(get<0, 0>(l), get<2>(l)));
  }
}

// The (row, column) of each accumulator of thread `tid`, as a (rows, columns) tensor of
// coordinates (the same view as acc_rowcol of its accumulators).
template <typename Config>
CUTE_HOST_DEVICE auto acc_coords(int tid) {
  typename Config::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor c = thr.partition_C(make_identity_tensor(
      make_shape(Int<Config::BM>{}, Int<Config::BN>{})));
  return make_tensor(c.data(), acc_rowcol(c.layout()));
}

}  // namespace arcface::cuda::tiles
