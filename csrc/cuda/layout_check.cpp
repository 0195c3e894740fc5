// Host-side check of the CuTe layouts the fused kernels (fused.cuh) rely on, for every
// tile configuration of tiles.h. Built and run by tests/test_cute_layouts.py with a host
// C++ compiler (no GPU, no nvcc needed):
//   1. the accumulator -> (row, column) map (tiles::acc_coords) covers every element of
//      the CTA tile exactly once over all threads;
//   2. in a thread's row-column view, mode 0 is the row (the same row along mode 1) and
//      mode 1 the column (the same column along mode 0): the epilogue's per-row loops;
//   3. a thread's columns come in pairs (2q, 2q + 1): the backward's 4-byte stores;
//   4. every row is held by the four lanes of one quad of one warp (lane ^ 1, lane ^ 2):
//      the per-row reduction is two shuffles;
//   5. (with 6) the shared-memory layouts, as tensors over a shared-memory pointer (the
//      way the kernels address them: CuTe applies the GMMA layouts' swizzle to the
//      pointer, so the bare layout function gives other offsets), place each 16-byte chunk (8 elements along k starting
//      at a multiple of 8) contiguously at a 16-byte aligned offset, and map every
//      (row, k, stage) to a distinct offset inside the buffer: the cp.async copies;
//   6. a thread's chunks in rows RPP apart, and in the other stages, lie at constant
//      steps from its first one (the copies add compile-time offsets to one address);
//   7. (sm90) each stage of the x and w layouts is where TMA writes a box of its rows x
//      BK features with the 128-byte swizzle (CU_TENSOR_MAP_SWIZZLE_128B): box row r at
//      byte 128 r of the stage, its 16-byte chunk q at chunk q ^ (r % 8) of that row
//      (the stage 1024-byte aligned): the TMA kernels' boxes land as wgmma reads them.
// Prints one line per configuration and exits non-zero at the first failure.
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "tiles.h"

using namespace arcface::cuda::tiles;

static int failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);     \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
      ++failures;                                          \
      return;                                              \
    }                                                      \
  } while (0)

template <class Cfg>
void check_acc(const char* name) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, TH = Cfg::THREADS;
  std::vector<int> owner(BM * BN, -1);
  std::vector<std::set<int>> row_threads(BM);
  int rows = -1, cols = -1;
  for (int t = 0; t < TH; ++t) {
    auto c = acc_coords<Cfg>(t);
    const int R = int(size<0>(c)), C = int(size<1>(c));
    if (rows < 0) {
      rows = R;
      cols = C;
    }
    CHECK(R == rows && C == cols, "%s: thread %d has a %dx%d view, thread 0 %dx%d", name, t, R,
          C, rows, cols);
    for (int m = 0; m < R; ++m) {
      for (int n = 0; n < C; ++n) {
        const int r = int(get<0>(c(m, n))), col = int(get<1>(c(m, n)));
        CHECK(r >= 0 && r < BM && col >= 0 && col < BN, "%s: (%d, %d) outside the tile", name,
              r, col);
        CHECK(r == int(get<0>(c(m, 0))), "%s: thread %d row mode %d is not one row", name, t,
              m);
        CHECK(col == int(get<1>(c(0, n))), "%s: thread %d column mode %d is not one column",
              name, t, n);
        CHECK(owner[r * BN + col] < 0, "%s: (%d, %d) held by threads %d and %d", name, r, col,
              owner[r * BN + col], t);
        owner[r * BN + col] = t;
        row_threads[r].insert(t);
      }
    }
  }
  for (int t = 0; t < TH; ++t) {  // GradEpilogue's paired stores: columns (2q, 2q + 1)
    auto c = acc_coords<Cfg>(t);
    for (int n = 0; n + 1 < int(size<1>(c)); n += 2) {
      const int c0 = int(get<1>(c(0, n))), c1 = int(get<1>(c(0, n + 1)));
      CHECK(c0 % 2 == 0 && c1 == c0 + 1, "%s: thread %d columns %d, %d are not a pair", name,
            t, c0, c1);
    }
  }
  for (int e = 0; e < BM * BN; ++e)
    CHECK(owner[e] >= 0, "%s: (%d, %d) held by no thread", name, e / BN, e % BN);
  for (int r = 0; r < BM; ++r) {
    const auto& ts = row_threads[r];
    CHECK(ts.size() == 4, "%s: row %d held by %zu threads, not a quad", name, r, ts.size());
    const int q = *ts.begin() / 4;
    for (int t : ts)
      CHECK(t / 4 == q, "%s: row %d held by threads of two quads (%d, %d)", name, r,
            *ts.begin(), t);
  }
  std::printf("ok %s accumulators: %d threads x (%d rows x %d columns) cover %dx%d once; "
              "rows in quads\n", name, TH, rows, cols, BM, BN);
}

// Element offset of (r, k, s) as the copies compute it (tiles::smem_offset).
template <class Layout>
struct SmemOffsets {
  int operator()(int r, int k, int s) const {
    return smem_offset<Layout, cutlass::bfloat16_t>(r, k, s);
  }
};

template <class Layout>
void check_smem(const char* name, const char* op, int rows, int bk, int stages, int threads) {
  SmemOffsets<Layout> l;
  const int cosz = int(cosize(Layout{}));
  std::vector<char> used(cosz, 0);
  for (int s = 0; s < stages; ++s)
    for (int r = 0; r < rows; ++r)
      for (int k0 = 0; k0 < bk; k0 += 8) {
        const int base = int(l(r, k0, s));
        CHECK(base % 8 == 0, "%s %s: chunk (%d, %d, %d) at offset %d, not 16-byte aligned",
              name, op, r, k0, s, base);
        for (int e = 0; e < 8; ++e) {
          const int off = int(l(r, k0 + e, s));
          CHECK(off == base + e, "%s %s: chunk (%d, %d, %d) not contiguous", name, op, r, k0,
                s);
          CHECK(off >= 0 && off < cosz && !used[off], "%s %s: offset %d reused or outside",
                name, op, off);
          used[off] = 1;
        }
      }
  // the copies' addressing (fused.cuh Loader): rows RPP apart and stages are constant
  // steps from a thread's first chunk
  const int rpp = threads / (bk / 8);
  for (int r = 0; r < rpp; ++r)
    for (int k0 = 0; k0 < bk; k0 += 8)
      for (int q = 0; q * rpp < rows; ++q)
        for (int s = 0; s < stages; ++s)
          CHECK(int(l(r + q * rpp, k0, s)) == int(l(r, k0, 0)) + q * rpp * bk + s * rows * bk,
                "%s %s: chunk (%d, %d, %d) is not the base plus constant steps", name, op,
                r + q * rpp, k0, s);
  std::printf("ok %s %s shared memory: %d x %d x %d, 16-byte chunks contiguous, aligned, "
              "distinct, constant steps per %d rows and per stage\n", name, op, rows, bk,
              stages, rpp);
}

// 7: byte offset where TMA's 128-byte swizzle puts element (r, k) of a box of 128-byte
// rows (a 16-bit element type, 64 per row), from a 1024-byte aligned destination.
int tma_sw128_byte(int r, int k) {
  const int byte = 2 * k;
  return 128 * r + (((byte / 16) ^ (r % 8)) * 16) + byte % 16;
}

template <class Layout>
void check_tma_box(const char* name, const char* op, int rows, int bk, int stages) {
  SmemOffsets<Layout> l;
  CHECK(bk * 2 == 128, "%s %s: BK = %d: a box row is not one 128-byte swizzle row", name, op,
        bk);
  for (int s = 0; s < stages; ++s) {
    const int stage_byte = 2 * int(l(0, 0, s));
    CHECK(stage_byte % 1024 == 0, "%s %s: stage %d at byte %d, not 1024-byte aligned", name,
          op, s, stage_byte);
    for (int r = 0; r < rows; ++r)
      for (int k = 0; k < bk; ++k) {
        const int got = 2 * int(l(r, k, s)) - stage_byte;
        CHECK(got == tma_sw128_byte(r, k),
              "%s %s: element (%d, %d) of stage %d at byte %d, TMA writes it at %d", name, op,
              r, k, s, got, tma_sw128_byte(r, k));
      }
  }
  std::printf("ok %s %s TMA box: %d x %d, 128-byte swizzle, as the layout reads it\n", name,
              op, rows, bk);
}

template <class Cfg>
void check_config(const char* name) {
  check_acc<Cfg>(name);
  check_smem<typename Cfg::SmemLayoutA>(name, "A (x)", Cfg::BM, Cfg::BK, Cfg::STAGES,
                                        Cfg::THREADS);
  check_smem<typename Cfg::SmemLayoutB>(name, "B (w)", Cfg::BN, Cfg::BK, Cfg::STAGES,
                                        Cfg::THREADS);
  CHECK(Cfg::THREADS == int(size(typename Cfg::TiledMma{})), "%s: %d threads, TiledMMA %d",
        name, Cfg::THREADS, int(size(typename Cfg::TiledMma{})));
  if constexpr (Cfg::THREADS == 256) {  // Sm90Config: the TMA kernels' boxes
    check_tma_box<typename Cfg::SmemLayoutA>(name, "A (x)", Cfg::BM, Cfg::BK, Cfg::STAGES);
    check_tma_box<typename Cfg::SmemLayoutB>(name, "B (w)", Cfg::BN, Cfg::BK, Cfg::STAGES);
  }
}

int main() {
  check_config<Sm80Config<cutlass::bfloat16_t>>("sm80 bf16");
  check_config<Sm80Config<cutlass::half_t>>("sm80 fp16");
  check_config<Sm90Config<cutlass::bfloat16_t>>("sm90 bf16");
  check_config<Sm90Config<cutlass::half_t>>("sm90 fp16");
  if (failures) std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
