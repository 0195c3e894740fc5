// CPU kernel of the forward / backward primitive (arcface_kernels/_ops.py).
//
// Parallelism: ONE parallel region per pass (plus nothing per tile), robust to other
// processes competing for the cores. The shard's classes are cut into chunks of bc
// classes (nr = bc*K rows of w) and the chunks into G <= kWorkers groups of consecutive
// chunks. In the region each worker takes groups from an atomic counter (a worker whose
// thread is descheduled simply takes fewer) and, for each chunk of its group, alone:
//   * gathers the chunk's rows of w (through index when given), converted to the
//     accumulation type and normalized: ws [nr, D], b [nr];
//   * walks the rows in tiles of bn: S = xs_tile @ ws^T [bn, nr] (at::mm_out on its own
//     buffers: inside the region ATen and MKL run single-threaded, no nested teams);
//   * runs the per-element math of arcface_math.h on the tile (fwd_rows / bwd_rows; with
//     a bias or the interclass filter fwd_rows_x / bwd_rows_x, with a softcap
//     fwd_rows_cap / bwd_rows_cap: the flags are tested once per tile, outside the
//     vectorized loops, and the plain loss keeps its own loops unchanged);
//   * forward: merges the tile into its GROUP's per-row state (online lse, sum of
//     logits, best cosine); backward: dX_g[tile] += G @ ws into its GROUP's partial,
//     dW_chunk += G^T @ xs_tile, then writes the chunk's rows of dw (their only owner).
// After the region the G group partials are merged serially in group order. Chunks,
// tiles and groups depend on N, C, D, K and `block` only, never on the thread count, and
// each group's chunks run in order on one thread: results are bitwise independent of
// the thread count and of the scheduling.
//
// Memory (sa = sizeof(acc_t), 4 for float / half / bfloat16, 8 for double):
//   per worker   W = nr * sa * (bn + 2*D + 4)   (S tile, ws, dW_chunk, b, q, K>1 scratch)
//   workers      = min(threads, G, max(1, kWorkspaceBytes / W))  => all of them <= kWorkspaceBytes
//                  (except a user `block` so large that one worker needs more)
//   bn           = min(N, kTileRows)
//   bc           = block                                          when block > 0 (uncapped)
//                = max(1, min(kWorkspaceBytes / kWorkers / (sa * (bn + 2*D + 4)) / K,
//                             ceil(C / kWorkers)))                when block == 0
//   G            = min(number of chunks, kWorkers)
//   plus the group partials: forward 5*G*N values, backward G*N*(D+1) values, and
//   xs [N, D]; with bias / softcap / filter up to 2*bc more per worker and, with a bias,
//   C + R/K values for dbias in the backward; nothing of size N x C.
// dbias: each shard position's sum over the rows of dL/dv is accumulated by the chunk's
// worker in row order; after the region the positions are added into their classes in
// shard order (deterministic, repeated index entries accumulate).
// Without -fopenmp (setup.py / CMakeLists.txt pass it) at::parallel_for is serial.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "../arcface_math.h"
#include "../ops.h"

// MKL's thread-local thread count (a weak reference: null where torch's BLAS is not MKL).
// Inside a parallel region MKL runs on one thread but still plans its matmul for the
// global count (a split sum for long products): the workers set 1 so that the bits do
// not depend on the number of threads.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
namespace arcface {
namespace {

// The element-wise loops are compiled twice for float:
// GCC clones the float versions for x86-64-v3 (AVX2, FMA) and picks one at load time
// (ifunc), so the vectorized loops use 8 lanes where the CPU has them and the library
// still runs on any x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define AK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define AK_CPU_CLONES
#endif
#define AK_ALWAYS_INLINE inline __attribute__((always_inline))
// NAME_isa(args, i0, i1): the float instantiation of NAME through the cloned (AVX2 +
// generic) entry point, the double one directly (float64 is for tests and gradcheck).
// flatten: the math helpers (exp_vec...) are inlined into the vectorized loops whatever
// the translation unit's inlining budget (--param inline-unit-growth) has left.
#define AK_ISA_ENTRY(NAME, ARGS)                                                  \
  AK_CPU_CLONES __attribute__((flatten)) void NAME##_f32(const ARGS<float>& a, int64_t i0, \
                                                         int64_t i1) {            \
    NAME<float>(a, i0, i1);                                                       \
  }                                                                               \
  inline void NAME##_isa(const ARGS<float>& a, int64_t i0, int64_t i1) {          \
    NAME##_f32(a, i0, i1);                                                        \
  }                                                                               \
  inline void NAME##_isa(const ARGS<double>& a, int64_t i0, int64_t i1) {         \
    NAME<double>(a, i0, i1);                                                      \
  }


// kWorkspaceBytes (ops.h, shared with the CUDA kernel, exposed as _C.WORKSPACE_BYTES)
// bounds all workers' buffers together (see the header for the formulas).
// Workers the default chunk is sized for, and the most class groups (the units of work
// and of the partial results; parallelism is capped by it).
constexpr int64_t kWorkers = 16;
constexpr int64_t kTileRows = 256;  // rows per tile

struct Plan {
  int64_t bc;       // classes per chunk
  int64_t nr;       // rows of w per chunk: bc * K
  int64_t bn;       // rows of x per tile
  int64_t nchunk;   // chunks
  int64_t ngroup;   // groups of consecutive chunks
  int64_t workers;  // parallel workers
  // chunks of group g: [chunk0(g), chunk0(g + 1))
  int64_t chunk0(int64_t g) const { return g * nchunk / ngroup; }
};

Plan make_plan(const Dims& dm, int64_t block, int64_t acc_bytes) {
  Plan p;
  p.bn = std::max<int64_t>(1, std::min(dm.n, kTileRows));
  const int64_t row_bytes = acc_bytes * (p.bn + 2 * dm.d + 4);  // a worker's, per w row
  // default: the workspace's share of one of kWorkers workers, and at most C / kWorkers
  // (rounded up) so that a small shard still makes kWorkers chunks
  p.bc = block > 0 ? block
                   : std::max<int64_t>(1, std::min(kWorkspaceBytes / kWorkers / row_bytes / dm.k,
                                                   (dm.c + kWorkers - 1) / kWorkers));
  p.bc = std::max<int64_t>(1, std::min(p.bc, std::max<int64_t>(dm.c, 1)));
  p.nr = p.bc * dm.k;
  p.nchunk = (dm.c + p.bc - 1) / p.bc;
  p.ngroup = std::min(p.nchunk, kWorkers);
  const int64_t fit = std::max<int64_t>(1, kWorkspaceBytes / (p.nr * row_bytes));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  p.workers = std::max<int64_t>(1, std::min({threads, p.ngroup, fit}));
  return p;
}

// One parallel region of pl.workers workers: each makes its buffers (make_buffers()),
// then pulls groups from a shared counter and runs work(g, buffers) until none is left.
// The region always spans all threads, also for one worker: the matmuls then always run
// single-threaded (one BLAS call splitting its sum across threads would change the bits).
template <typename MakeBuffers, typename Work>
void run_workers(const Plan& pl, const MakeBuffers& make_buffers, const Work& work) {
  std::atomic<int64_t> next{0};
  auto body = [&](int64_t w0, int64_t) {
    if (w0 >= pl.workers) return;  // beyond the workspace's worker count
    int64_t g = next.fetch_add(1);
    if (g >= pl.ngroup) return;
    // the worker threads do not inherit the caller's dispatch state: skip autograd
    at::AutoDispatchBelowADInplaceOrView guard;
    struct MklOneThread {  // restores the thread's previous setting (0: the global one)
      int prev = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
      ~MklOneThread() {
        if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
      }
    } mkl_one_thread;
    auto buffers = make_buffers();
    for (; g < pl.ngroup; g = next.fetch_add(1)) work(g, buffers);
  };
  at::parallel_for(0, std::max<int64_t>(1, at::get_num_threads()), 1, body);
}

// Copies one row of d values to dst as acc_t, normalized when `normalize`; returns its
// inverse norm 1 / max(|row|, eps) (1 without normalization).
template <typename scalar_t, typename acc_t>
acc_t copy_row(const scalar_t* src, int64_t d, bool normalize, acc_t* dst) {
  acc_t ss = 0;
  for (int64_t t = 0; t < d; ++t) {
    const acc_t v = static_cast<acc_t>(src[t]);
    dst[t] = v;
    ss += v * v;
  }
  if (!normalize) return acc_t(1);
  acc_t inv = inv_norm(ss);
  if (ss == std::numeric_limits<acc_t>::infinity()) {
    // the sum of squares overflowed (|row| above ~1.8e19 in float): again, scaled by the
    // largest element (an inf element keeps the inverse norm 0)
    acc_t mx = 0;
    for (int64_t t = 0; t < d; ++t) mx = std::max(mx, std::abs(dst[t]));
    if (mx < std::numeric_limits<acc_t>::infinity()) {
      acc_t sc = 0;
      for (int64_t t = 0; t < d; ++t) sc += (dst[t] / mx) * (dst[t] / mx);
      inv = inv_norm_scaled(mx, sc);
    }
  }
  for (int64_t t = 0; t < d; ++t) dst[t] *= inv;
  return inv;
}

// xs = x (as acc_t) normalized by rows (when normalize), and a = 1 / max(|x_i|, eps).
// Serial: O(N*D), before the region.
template <typename scalar_t, typename acc_t>
void prepare_rows(const at::Tensor& x, bool normalize, acc_t* xs, acc_t* a, const Dims& dm) {
  const scalar_t* xp = x.data_ptr<scalar_t>();
  for (int64_t i = 0; i < dm.n; ++i) a[i] = copy_row(xp + i * dm.d, dm.d, normalize, xs + i * dm.d);
}

// Row of w of shard position `pos`, sub-center k.
inline int64_t w_row(const int64_t* idx, int64_t pos, int64_t k, int64_t K) {
  return (idx ? idx[pos] : pos) * K + k;
}

// Gathers classes [j0, j0 + nc) into ws [nc*K, D] (acc_t, normalized), b [nc*K]
// (by the chunk's worker).
template <typename scalar_t, typename acc_t>
void gather_chunk(const scalar_t* wp, const int64_t* idx, int64_t j0, int64_t nc,
                  const Dims& dm, bool normalize, acc_t* ws, acc_t* b) {
  for (int64_t rr = 0; rr < nc * dm.k; ++rr) {
    const scalar_t* src = wp + w_row(idx, j0 + rr / dm.k, rr % dm.k, dm.k) * dm.d;
    b[rr] = copy_row(src, dm.d, normalize, ws + rr * dm.d);
  }
}

// The bias of classes [j0, j0 + nc) in acc_t (by the chunk's worker).
template <typename scalar_t, typename acc_t>
void gather_bias(const scalar_t* bias, const int64_t* idx, int64_t j0, int64_t nc,
                 acc_t* out) {
  for (int64_t j = 0; j < nc; ++j)
    out[j] = static_cast<acc_t>(bias[idx ? idx[j0 + j] : j0 + j]);
}

// Class cosines of one tile row: srow [nc*K] dot products of normalized vectors ->
// c [nc] (the max over sub-centers, clamped), kbest [nc] its sub-center (K > 1 only).
// c may alias srow (in place) when K == 1 or when kbest is not needed.
template <typename acc_t>
AK_ALWAYS_INLINE void row_cosines(acc_t* srow, acc_t* c, int64_t nc, int64_t K, bool normalize,
                 int32_t* kbest) {
  if (K == 1) {
    if (normalize)
      for (int64_t j = 0; j < nc; ++j) c[j] = cosine(srow[j], true);
    else if (c != srow)
      for (int64_t j = 0; j < nc; ++j) c[j] = srow[j];
    return;
  }
  for (int64_t j = 0; j < nc; ++j) {
    acc_t best = cosine(srow[j * K], normalize);
    int32_t kb = 0;
    for (int64_t k = 1; k < K; ++k) {
      acc_t v = cosine(srow[j * K + k], normalize);
      if (better_max(v, k, best, kb)) {
        best = v;
        kb = static_cast<int32_t>(k);
      }
    }
    c[j] = best;  // j <= j*K: in place never overwrites an unread entry
    if (kbest) kbest[j] = kb;
  }
}

// ---- the element-wise work of a range of tile rows ----------------------------------

// Forward state of a tile: the dot products S [bn, nr] and the per-row online state of
// the chunk's group (st_*, sz: N long, the group's own), tgt the output (one writer per row).
// The general version (fwd_rows_terms) also reads the chunk's bias [nc] (zeros without a
// bias) and, with a bias, uses keys [nc] as scratch (else nullptr); st_b then holds the
// best top-1 key (s c + bias with a bias).
// Merge one row's top-1 over key[0, nc) (classes j0 ..) into its running (best, arg):
// the first NaN, else the first maximum, in better_max's order (first chunk: taken as
// is). Returns the sum (NaN shows in it) and the max of the keys, both vectorized.
template <typename acc_t>
struct SumMax {
  acc_t sum, max;
};
template <typename acc_t>
AK_ALWAYS_INLINE SumMax<acc_t> merge_top1(const acc_t* key, int64_t nc, int64_t j0,
                                          bool first, acc_t& best, int64_t& arg) {
  acc_t ksum = 0, kmax = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(+ : ksum) reduction(max : kmax)
  for (int64_t j = 0; j < nc; ++j) {
    ksum += key[j];
    kmax = key[j] > kmax ? key[j] : kmax;
  }
  int64_t jbest = -1;
  if (ksum != ksum) {
    for (int64_t j = 0; j < nc && jbest < 0; ++j)
      if (key[j] != key[j]) jbest = j;
  }
  if (jbest < 0 && (first || better_max(kmax, j0, best, arg))) {
    for (int64_t j = 0; j < nc && jbest < 0; ++j)
      if (key[j] == kmax) jbest = j;
  }
  if (jbest >= 0 && (first || better_max(key[jbest], j0 + jbest, best, arg))) {
    best = key[jbest];
    arg = j0 + jbest;
  }
  return SumMax<acc_t>{ksum, kmax};
}

template <typename acc_t>
struct FwdRows {
  acc_t* S;
  int64_t nr, nc, K, j0, r0;
  bool first;  // first chunk of its group
  const int64_t* lab;
  Margin<acc_t> mp;
  acc_t *st_m, *st_s, *st_b;
  int64_t* st_a;
  acc_t *sz, *tgt;
  const acc_t* bias;
  acc_t* keys;
};

template <typename acc_t>
AK_ALWAYS_INLINE void fwd_rows(const FwdRows<acc_t>& args, int64_t i0, int64_t i1) {
  const FwdRows<acc_t> a = args;  // a local copy: stores through its pointers cannot alias it
  for (int64_t ii = i0; ii < i1; ++ii) {
      const int64_t i = a.r0 + ii;
      acc_t* c = a.S + ii * a.nr;
      row_cosines<acc_t>(c, c, a.nc, a.K, a.mp.normalize, nullptr);
      // the best cosine (no margin) and its first class, NaN first; the sum of the cosines
      const SumMax<acc_t> sm = merge_top1(c, a.nc, a.j0, a.first, a.st_b[i], a.st_a[i]);
      const acc_t csum = sm.sum, cmax = sm.max;
      // online lse of the logits; the target (margin) apart from the others
      const int64_t lj = a.lab[i] - a.j0;
      const bool has = a.lab[i] >= 0 && lj >= 0 && lj < a.nc;
      const acc_t s = a.mp.s;
      acc_t zsum = s * csum;
      Lse<acc_t> tile;
      if (!has) {
        const acc_t m = s * cmax;
        acc_t e = 0;
#pragma omp simd reduction(+ : e)
        for (int64_t j = 0; j < a.nc; ++j) e += exp_vec(s * c[j] - m);
        tile = Lse<acc_t>{m, e};
      } else {
        const acc_t ct = c[lj], zt = s * psi(ct, a.mp);
        zsum += zt - s * ct;
        a.tgt[i] = zt;  // the only tile that holds (i, label_i)
        acc_t cm = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : cm)
        for (int64_t j = 0; j < lj; ++j) cm = c[j] > cm ? c[j] : cm;
#pragma omp simd reduction(max : cm)
        for (int64_t j = lj + 1; j < a.nc; ++j) cm = c[j] > cm ? c[j] : cm;
        const acc_t m = s * cm;
        acc_t e = 0;
#pragma omp simd reduction(+ : e)
        for (int64_t j = 0; j < lj; ++j) e += exp_vec(s * c[j] - m);
#pragma omp simd reduction(+ : e)
        for (int64_t j = lj + 1; j < a.nc; ++j) e += exp_vec(s * c[j] - m);
        tile = lse_merge(Lse<acc_t>{a.nc > 1 ? m : cm, e}, Lse<acc_t>{zt, acc_t(1)});
      }
      // a NaN cosine makes the row's lse NaN: also when every cosine of the chunk is NaN
      // (the max is then -inf and lse_merge would take the tile for an empty one)
      if (csum != csum) tile = Lse<acc_t>{csum, csum};
      const Lse<acc_t> mr = lse_merge(Lse<acc_t>{a.st_m[i], a.st_s[i]}, tile);
      a.st_m[i] = mr.m;
      a.st_s[i] = mr.sum;
      a.sz[i] += zsum;
  }
}

AK_ISA_ENTRY(fwd_rows, FwdRows)

// fwd_rows with the terms of bias / softcap / interclass filter (arcface_math.h logit_z):
// the top-1 over s c + bias (raw c; c itself without a bias), then the logits z in place
// of the cosines and their online lse. a.bias is never null here (zeros without a bias);
// a.keys is null without a bias. kCap: softcap on (off: the loops vectorize).
template <typename acc_t, bool kCap>
AK_ALWAYS_INLINE void fwd_rows_terms(const FwdRows<acc_t>& args, int64_t i0, int64_t i1) {
  const FwdRows<acc_t> a = args;  // a local copy: stores through its pointers cannot alias it
  constexpr Cap kC = kCap ? Cap::kOn : Cap::kOff;
  const acc_t s = a.mp.s, ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t ii = i0; ii < i1; ++ii) {
    const int64_t i = a.r0 + ii;
    acc_t* c = a.S + ii * a.nr;
    row_cosines<acc_t>(c, c, a.nc, a.K, a.mp.normalize, nullptr);
    const acc_t* key = c;
    if (a.keys) {
#pragma omp simd
      for (int64_t j = 0; j < a.nc; ++j) a.keys[j] = s * c[j] + a.bias[j];
      key = a.keys;
    }
    merge_top1(key, a.nc, a.j0, a.first, a.st_b[i], a.st_a[i]);
    // the logits in place of the cosines; the target's afterwards (its margin)
    const int64_t lj = a.lab[i] - a.j0;
    const bool has = a.lab[i] >= 0 && lj >= 0 && lj < a.nc;
    const acc_t ct = has ? c[lj] : acc_t(0);
#pragma omp simd
    for (int64_t j = 0; j < a.nc; ++j) c[j] = logit_z<kC>(c[j], false, a.bias[j], a.mp);
    if (has) {
      const acc_t zt = logit_z<kC>(ct, true, a.bias[lj], a.mp);
      c[lj] = zt;
      a.tgt[i] = zt;  // the only tile that holds (i, label_i)
    }
    acc_t zsum = 0, zmax = ninf;
#pragma omp simd reduction(+ : zsum) reduction(max : zmax)
    for (int64_t j = 0; j < a.nc; ++j) {
      zsum += c[j];
      zmax = c[j] > zmax ? c[j] : zmax;
    }
    acc_t e = 0;
#pragma omp simd reduction(+ : e)
    for (int64_t j = 0; j < a.nc; ++j) e += exp_vec(c[j] - zmax);
    Lse<acc_t> tile{zmax, e};
    if (zsum != zsum) tile = Lse<acc_t>{zsum, zsum};  // a NaN logit: the row's lse is NaN
    const Lse<acc_t> mr = lse_merge(Lse<acc_t>{a.st_m[i], a.st_s[i]}, tile);
    a.st_m[i] = mr.m;
    a.st_s[i] = mr.sum;
    a.sz[i] += zsum;
  }
}

template <typename acc_t>
AK_ALWAYS_INLINE void fwd_rows_x(const FwdRows<acc_t>& a, int64_t i0, int64_t i1) {
  fwd_rows_terms<acc_t, false>(a, i0, i1);
}
template <typename acc_t>
AK_ALWAYS_INLINE void fwd_rows_cap(const FwdRows<acc_t>& a, int64_t i0, int64_t i1) {
  fwd_rows_terms<acc_t, true>(a, i0, i1);
}
AK_ISA_ENTRY(fwd_rows_x, FwdRows)
AK_ISA_ENTRY(fwd_rows_cap, FwdRows)

template <typename scalar_t, typename acc_t>
void fwd_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                const int64_t* idx, const scalar_t* bias, const Margin<acc_t>& mp,
                const Dims& dm, int64_t block,
                at::Tensor& lse, at::Tensor& target, at::Tensor& sum_z, at::Tensor& max_z,
                at::Tensor& argmax) {
  const auto acc_opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t N = dm.n, D = dm.d, K = dm.k;
  const Plan pl = make_plan(dm, block, sizeof(acc_t));
  const int64_t G = pl.ngroup;
  at::Tensor xs_t = at::empty({N, D}, acc_opt), a_t = at::empty({N}, acc_opt);
  prepare_rows<scalar_t, acc_t>(x, mp.normalize, xs_t.data_ptr<acc_t>(),
                                a_t.data_ptr<acc_t>(), dm);
  // per group and row: online lse (max, sum), sum of logits, best cosine and its class
  std::vector<acc_t> gm(G * N), gs(G * N), gz(G * N), gb(G * N);
  std::vector<int64_t> ga(G * N);
  acc_t* tgt = target.data_ptr<acc_t>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  std::fill(tgt, tgt + N, acc_t(0));
  const bool general = bias || mp.capped || mp.filter;

  struct Buffers {
    at::Tensor ws, b, s;           // ws [nr, D], b [nr], S tile [bn * nr]
    // the general path: the chunk's bias [bc] (zeros without a bias), top-1 keys [bc]
    // (with a bias)
    std::vector<acc_t> bias, keys;
  };
  auto make_buffers = [&] {
    return Buffers{at::empty({pl.nr, D}, acc_opt), at::empty({pl.nr}, acc_opt),
                   at::empty({pl.bn * pl.nr}, acc_opt),
                   std::vector<acc_t>(general ? pl.bc : 0, acc_t(0)),
                   std::vector<acc_t>(bias ? pl.bc : 0)};
  };
  run_workers(pl, make_buffers, [&](int64_t g, Buffers& buf) {
    const at::Tensor &ws_t = buf.ws, &b_t = buf.b, &s_t = buf.s;
    acc_t* S = s_t.data_ptr<acc_t>();
    acc_t *m = gm.data() + g * N, *sm = gs.data() + g * N, *z = gz.data() + g * N;
    std::fill(m, m + N, -std::numeric_limits<acc_t>::infinity());
    std::fill(sm, sm + N, acc_t(0));
    std::fill(z, z + N, acc_t(0));
    for (int64_t ch = pl.chunk0(g); ch < pl.chunk0(g + 1); ++ch) {
      const int64_t j0 = ch * pl.bc, nc = std::min(pl.bc, dm.c - j0), nr = nc * K;
      gather_chunk<scalar_t, acc_t>(wp, idx, j0, nc, dm, mp.normalize,
                                    ws_t.data_ptr<acc_t>(), b_t.data_ptr<acc_t>());
      if (bias) gather_bias(bias, idx, j0, nc, buf.bias.data());
      at::Tensor wv = ws_t.narrow(0, 0, nr);
      for (int64_t r0 = 0; r0 < N; r0 += pl.bn) {
        const int64_t bn = std::min(pl.bn, N - r0);
        at::Tensor sv = s_t.narrow(0, 0, bn * nr).view({bn, nr});
        at::mm_out(sv, xs_t.narrow(0, r0, bn), wv.t());
        FwdRows<acc_t> fr{S, nr, nc, K, j0, r0, ch == pl.chunk0(g), lab, mp, m, sm,
                          gb.data() + g * N, ga.data() + g * N, z, tgt,
                          general ? buf.bias.data() : nullptr,
                          bias ? buf.keys.data() : nullptr};
        if (mp.capped) {
          fwd_rows_cap_isa(fr, 0, bn);
        } else if (general) {
          fwd_rows_x_isa(fr, 0, bn);
        } else {
          fwd_rows_isa(fr, 0, bn);
        }
      }
    }
  });

  // the groups' states merged in group order
  acc_t* lo = lse.data_ptr<acc_t>();
  acc_t* mo = max_z.data_ptr<acc_t>();
  acc_t* so = sum_z.data_ptr<acc_t>();
  int64_t* ao = argmax.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    Lse<acc_t> l = lse_empty<acc_t>();
    acc_t zs = 0, best = -std::numeric_limits<acc_t>::infinity();
    int64_t arg = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t o = g * N + i;
      l = lse_merge(l, Lse<acc_t>{gm[o], gs[o]});
      zs += gz[o];
      if (g == 0 || better_max(gb[o], ga[o], best, arg)) {
        best = gb[o];
        arg = ga[o];
      }
    }
    lo[i] = lse_value(l);
    // the capped top-1 logit: s c + bias (the key itself with a bias), -inf with no class
    mo[i] = G == 0 ? best : softcap_map(bias ? best : mp.s * best, mp);
    ao[i] = arg;
    so[i] = zs;
  }
}

// Backward state of a tile: S [bn, nr] becomes G in place; q [nr] is the chunk's q_j
// (summed over its row tiles), cbuf / kbuf the worker's scratch for K > 1; r [N] the
// group's partial of r_i.
// The general version (bwd_rows_terms) also reads the chunk's bias [nc] (zeros without a
// bias) and adds each element's dL/dv to db [nc] (the chunk's positions of dbias, or a
// scratch buffer without a bias).
template <typename acc_t>
struct BwdRows {
  acc_t* S;
  int64_t nr, nc, K, j0, r0;
  const int64_t* lab;
  Margin<acc_t> mp;
  const acc_t *lse, *gp, *gt, *gs;
  acc_t* q;
  acc_t* cbuf;
  int32_t* kbuf;
  acc_t* r;
  const acc_t* bias;
  acc_t* db;
};

template <typename acc_t>
AK_ALWAYS_INLINE void bwd_rows(const BwdRows<acc_t>& args, int64_t i0, int64_t i1) {
  const BwdRows<acc_t> a = args;  // a local copy: stores through its pointers cannot alias it
  for (int64_t ii = i0; ii < i1; ++ii) {
      const int64_t i = a.r0 + ii;
      acc_t* srow = a.S + ii * a.nr;
      acc_t* c = a.K == 1 ? srow : a.cbuf;
      int32_t* kbest = a.kbuf;
      row_cosines<acc_t>(srow, c, a.nc, a.K, a.mp.normalize, kbest);
      const acc_t li = a.lse[i], gpi = a.gp[i], gsi = a.gs[i];
      const int64_t lj = a.lab[i] - a.j0;
      const bool has = a.lab[i] >= 0 && lj >= 0 && lj < a.nc;
      // G_ij in place of the dot products (at the arg-max sub-center when a.K > 1);
      // the target is done on its own: exp(s*c_t - lse) may be huge and must not
      // enter r or q.
      const int64_t jt = has ? lj : a.nc;
      acc_t r_i = 0;
      if (a.K == 1) {
#pragma omp simd reduction(+ : r_i)
        for (int64_t j = 0; j < jt; ++j) {
          const acc_t g = grad_nontarget(a.mp.s * c[j], li, gpi, gsi, a.mp.s);
          r_i += g * c[j];
          a.q[j] += g * c[j];
          srow[j] = g;
        }
#pragma omp simd reduction(+ : r_i)
        for (int64_t j = jt + 1; j < a.nc; ++j) {
          const acc_t g = grad_nontarget(a.mp.s * c[j], li, gpi, gsi, a.mp.s);
          r_i += g * c[j];
          a.q[j] += g * c[j];
          srow[j] = g;
        }
        if (has) {
          const acc_t ct = c[lj];
          const acc_t g = grad_target(ct, li, gpi, a.gt[i], gsi, a.mp);
          r_i += g * ct;
          a.q[lj] += g * ct;
          srow[lj] = g;
        }
      } else {
        for (int64_t j = 0; j < a.nc; ++j) {
          const acc_t cj = c[j];
          const acc_t g = j == jt ? grad_target(cj, li, gpi, a.gt[i], gsi, a.mp)
                                  : grad_nontarget(a.mp.s * cj, li, gpi, gsi, a.mp.s);
          r_i += g * cj;
          for (int64_t k = 0; k < a.K; ++k) srow[j * a.K + k] = acc_t(0);
          srow[j * a.K + kbest[j]] = g;
          a.q[j * a.K + kbest[j]] += g * cj;
        }
      }
      a.r[i] += r_i;
  }
}

AK_ISA_ENTRY(bwd_rows, BwdRows)

// bwd_rows with the terms of bias / softcap / interclass filter (arcface_math.h
// grad_dv / grad_c), and dbias: db[j] += dL/dv. a.bias and a.db are never null here (zeros /
// scratch without a bias). kCap: softcap on (off: the loops vectorize).
template <typename acc_t, bool kCap>
AK_ALWAYS_INLINE void bwd_rows_terms(const BwdRows<acc_t>& args, int64_t i0, int64_t i1) {
  const BwdRows<acc_t> a = args;  // a local copy: stores through its pointers cannot alias it
  constexpr Cap kC = kCap ? Cap::kOn : Cap::kOff;
  for (int64_t ii = i0; ii < i1; ++ii) {
    const int64_t i = a.r0 + ii;
    acc_t* srow = a.S + ii * a.nr;
    acc_t* c = a.K == 1 ? srow : a.cbuf;
    int32_t* kbest = a.kbuf;
    row_cosines<acc_t>(srow, c, a.nc, a.K, a.mp.normalize, kbest);
    const acc_t li = a.lse[i], gpi = a.gp[i], gti = a.gt[i], gsi = a.gs[i];
    const int64_t lj = a.lab[i] - a.j0;
    const bool has = a.lab[i] >= 0 && lj >= 0 && lj < a.nc;
    const int64_t jt = has ? lj : a.nc;
    acc_t r_i = 0;
    if (a.K == 1) {
      // the non-targets, then the target on its own (as in bwd_rows)
#pragma omp simd reduction(+ : r_i)
      for (int64_t j = 0; j < jt; ++j) {
        const acc_t cj = c[j];
        const acc_t dv = grad_dv<kC>(cj, false, a.bias[j], li, gpi, gti, gsi, a.mp);
        const acc_t g = grad_c(cj, false, dv, a.mp);
        a.db[j] += dv;
        r_i += g * cj;
        a.q[j] += g * cj;
        srow[j] = g;
      }
#pragma omp simd reduction(+ : r_i)
      for (int64_t j = jt + 1; j < a.nc; ++j) {
        const acc_t cj = c[j];
        const acc_t dv = grad_dv<kC>(cj, false, a.bias[j], li, gpi, gti, gsi, a.mp);
        const acc_t g = grad_c(cj, false, dv, a.mp);
        a.db[j] += dv;
        r_i += g * cj;
        a.q[j] += g * cj;
        srow[j] = g;
      }
      if (has) {
        const acc_t ct = c[lj];
        const acc_t dv = grad_dv<kC>(ct, true, a.bias[lj], li, gpi, gti, gsi, a.mp);
        const acc_t g = grad_c(ct, true, dv, a.mp);
        a.db[lj] += dv;
        r_i += g * ct;
        a.q[lj] += g * ct;
        srow[lj] = g;
      }
    } else {
      for (int64_t j = 0; j < a.nc; ++j) {
        const acc_t cj = c[j];
        const acc_t dv = grad_dv<kC>(cj, j == jt, a.bias[j], li, gpi, gti, gsi, a.mp);
        const acc_t g = grad_c(cj, j == jt, dv, a.mp);
        a.db[j] += dv;
        r_i += g * cj;
        for (int64_t k = 0; k < a.K; ++k) srow[j * a.K + k] = acc_t(0);
        srow[j * a.K + kbest[j]] = g;
        a.q[j * a.K + kbest[j]] += g * cj;
      }
    }
    a.r[i] += r_i;
  }
}

template <typename acc_t>
AK_ALWAYS_INLINE void bwd_rows_x(const BwdRows<acc_t>& a, int64_t i0, int64_t i1) {
  bwd_rows_terms<acc_t, false>(a, i0, i1);
}
template <typename acc_t>
AK_ALWAYS_INLINE void bwd_rows_cap(const BwdRows<acc_t>& a, int64_t i0, int64_t i1) {
  bwd_rows_terms<acc_t, true>(a, i0, i1);
}
AK_ISA_ENTRY(bwd_rows_x, BwdRows)
AK_ISA_ENTRY(bwd_rows_cap, BwdRows)

template <typename scalar_t, typename acc_t>
void bwd_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                const int64_t* idx, const scalar_t* bias, const at::Tensor& lse_t,
                const at::Tensor& gp_t, const at::Tensor& gt_t, const at::Tensor& gs_t,
                const Margin<acc_t>& mp, const Dims& dm, int64_t block, at::Tensor& dx,
                at::Tensor& dw, at::Tensor& dbias) {
  const auto acc_opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t N = dm.n, D = dm.d, K = dm.k;
  if (N == 0) return;  // dx is empty, dw and dbias zero
  const Plan pl = make_plan(dm, block, sizeof(acc_t));
  const bool general = bias || mp.capped || mp.filter;
  // dbias per shard position (each written by its chunk's worker only)
  std::vector<acc_t> dbias_pos(bias ? dm.c : 0, acc_t(0));
  const int64_t G = pl.ngroup;
  at::Tensor xs_t = at::empty({N, D}, acc_opt), a_t = at::empty({N}, acc_opt);
  prepare_rows<scalar_t, acc_t>(x, mp.normalize, xs_t.data_ptr<acc_t>(),
                                a_t.data_ptr<acc_t>(), dm);
  // per group: dX_g = sum over its classes of G_ij ws_j, and r_g,i = sum G_ij c_ij
  at::Tensor dxg_t = at::empty({G, N, D}, acc_opt);
  std::vector<acc_t> rg(G * N);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const acc_t* lse = lse_t.data_ptr<acc_t>();
  const acc_t* gp = gp_t.data_ptr<acc_t>();
  const acc_t* gt = gt_t.data_ptr<acc_t>();
  const acc_t* gs = gs_t.data_ptr<acc_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  scalar_t* dwp = dw.data_ptr<scalar_t>();

  // A class repeated in index has several owners: their rows of dw go to dup [slot] and
  // are added in shard order after the region. dslot[pos]: the slot, -1 for the others.
  std::vector<int64_t> dslot;
  int64_t ndup = 0;
  if (idx) {
    std::vector<int32_t> count(dm.r / K, 0);
    for (int64_t p = 0; p < dm.c; ++p) ++count[idx[p]];
    dslot.assign(dm.c, -1);
    for (int64_t p = 0; p < dm.c; ++p)
      if (count[idx[p]] > 1) dslot[p] = ndup++;
  }
  at::Tensor dup_t = at::empty({ndup * K, D}, acc_opt);
  acc_t* dup = dup_t.data_ptr<acc_t>();

  struct Buffers {
    at::Tensor ws, b, s, dwa;    // ws [nr, D], b [nr], S tile [bn * nr], dW_chunk [nr, D]
    std::vector<acc_t> q, cbuf;  // q [nr]; class cosines [bc] (K > 1)
    std::vector<int32_t> kbuf;   // their sub-centers [bc] (K > 1)
    std::vector<acc_t> bias;     // the chunk's bias [bc] (general path; zeros without one)
    std::vector<acc_t> db;       // scratch dL/dv sums [bc] (general path without a bias)
  };
  auto make_buffers = [&] {
    return Buffers{at::empty({pl.nr, D}, acc_opt), at::empty({pl.nr}, acc_opt),
                   at::empty({pl.bn * pl.nr}, acc_opt), at::empty({pl.nr, D}, acc_opt),
                   std::vector<acc_t>(pl.nr), std::vector<acc_t>(K > 1 ? pl.bc : 0),
                   std::vector<int32_t>(K > 1 ? pl.bc : 0),
                   std::vector<acc_t>(general ? pl.bc : 0, acc_t(0)),
                   std::vector<acc_t>(general && !bias ? pl.bc : 0)};
  };
  run_workers(pl, make_buffers, [&](int64_t g, Buffers& buf) {
    acc_t* ws = buf.ws.template data_ptr<acc_t>();
    acc_t* bb = buf.b.template data_ptr<acc_t>();
    acc_t* S = buf.s.template data_ptr<acc_t>();
    const acc_t* da = buf.dwa.template data_ptr<acc_t>();
    at::Tensor dxg = dxg_t.select(0, g);
    dxg.zero_();
    acc_t* r = rg.data() + g * N;
    std::fill(r, r + N, acc_t(0));
    for (int64_t ch = pl.chunk0(g); ch < pl.chunk0(g + 1); ++ch) {
      const int64_t j0 = ch * pl.bc, nc = std::min(pl.bc, dm.c - j0), nr = nc * K;
      gather_chunk<scalar_t, acc_t>(wp, idx, j0, nc, dm, mp.normalize, ws, bb);
      if (bias) gather_bias(bias, idx, j0, nc, buf.bias.data());
      at::Tensor wv = buf.ws.narrow(0, 0, nr);
      at::Tensor dwa = buf.dwa.narrow(0, 0, nr);
      std::fill(buf.q.begin(), buf.q.end(), acc_t(0));
      for (int64_t r0 = 0; r0 < N; r0 += pl.bn) {
        const int64_t bn = std::min(pl.bn, N - r0);
        at::Tensor sv = buf.s.narrow(0, 0, bn * nr).view({bn, nr});
        at::Tensor xv = xs_t.narrow(0, r0, bn);
        at::mm_out(sv, xv, wv.t());
        BwdRows<acc_t> br{S, nr, nc, K, j0, r0, lab, mp, lse, gp, gt, gs, buf.q.data(),
                          K == 1 ? nullptr : buf.cbuf.data(),
                          K == 1 ? nullptr : buf.kbuf.data(), r,
                          general ? buf.bias.data() : nullptr,
                          bias ? dbias_pos.data() + j0 : (general ? buf.db.data() : nullptr)};
        if (mp.capped) {
          bwd_rows_cap_isa(br, 0, bn);
        } else if (general) {
          bwd_rows_x_isa(br, 0, bn);
        } else {
          bwd_rows_isa(br, 0, bn);
        }
        // dX_g += G @ ws ; dW_chunk (+)= G^T @ xs
        dxg.narrow(0, r0, bn).addmm_(sv, wv);
        if (r0 == 0) {
          at::mm_out(dwa, sv.t(), xv);
        } else {
          dwa.addmm_(sv.t(), xv);
        }
      }
      // the chunk's rows of dw: b_j (sum_i G_ij xs_i - q_j ws_j)
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t pos = j0 + rr / K;
        const acc_t* src = da + rr * D;
        const acc_t* wsr = ws + rr * D;
        const acc_t qr = buf.q[rr], br = bb[rr];
        const bool dupe = idx && dslot[pos] >= 0;
        acc_t* tmp = dupe ? dup + (dslot[pos] * K + rr % K) * D : nullptr;
        scalar_t* dst = dwp + w_row(idx, pos, rr % K, K) * D;
        for (int64_t t = 0; t < D; ++t) {
          const acc_t v = mp.normalize ? norm_grad(src[t], qr, wsr[t], br) : src[t];
          if (dupe) {
            tmp[t] = v;
          } else {
            dst[t] = static_cast<scalar_t>(v);
          }
        }
      }
    }
  });

  // repeated classes: their rows added in shard order
  for (int64_t pos = 0; pos < (idx ? dm.c : 0); ++pos) {
    if (dslot[pos] < 0) continue;
    for (int64_t k = 0; k < K; ++k) {
      scalar_t* dst = dwp + w_row(idx, pos, k, K) * D;
      const acc_t* src = dup + (dslot[pos] * K + k) * D;
      for (int64_t t = 0; t < D; ++t)
        dst[t] = static_cast<scalar_t>(static_cast<acc_t>(dst[t]) + src[t]);
    }
  }
  // dbias[g]: the positions of class g added in shard order
  if (bias) {
    std::vector<acc_t> acc(dm.r / K, acc_t(0));
    for (int64_t pos = 0; pos < dm.c; ++pos) acc[idx ? idx[pos] : pos] += dbias_pos[pos];
    scalar_t* dbp = dbias.data_ptr<scalar_t>();
    for (int64_t g = 0; g < dm.r / K; ++g) dbp[g] = static_cast<scalar_t>(acc[g]);
  }
  // dx_i = a_i (sum_g dX_g,i - r_i xs_i), the groups summed in group order
  const acc_t* dxg = dxg_t.data_ptr<acc_t>();
  const acc_t* xs = xs_t.data_ptr<acc_t>();
  const acc_t* a = a_t.data_ptr<acc_t>();
  scalar_t* dxo = dx.data_ptr<scalar_t>();
  std::vector<acc_t> u(D);
  for (int64_t i = 0; i < N; ++i) {
    acc_t ri = 0;
    std::fill(u.begin(), u.end(), acc_t(0));
    for (int64_t g = 0; g < G; ++g) {
      ri += rg[g * N + i];
      const acc_t* src = dxg + (g * N + i) * D;
      for (int64_t t = 0; t < D; ++t) u[t] += src[t];
    }
    for (int64_t t = 0; t < D; ++t) {
      acc_t v = u[t];
      if (mp.normalize) v = norm_grad(v, ri, xs[i * D + t], a[i]);
      dxo[i * D + t] = static_cast<scalar_t>(v);
    }
  }
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "the CPU kernel got tensors on ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpp_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& index_in, const std::optional<at::Tensor>& bias_in,
    double s, double m1, double m2, double m3, int64_t wrap_mode, int64_t grad_mode,
    bool normalize, int64_t sub_centers, double softcap, double interclass,
    double grad_filter, int64_t block) {
  Dims dm = check_fwd_args(x_in, w_in, labels_in, index_in, bias_in, s, m1, m2, m3,
                           wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass,
                           grad_filter, block);
  check_cpu(x_in);
  check_values(labels_in, index_in, dm);
  const ContiguousInputs in = make_contiguous(x_in, w_in, labels_in, index_in, bias_in);
  const at::Tensor &x = in.x, &w = in.w, &labels = in.labels;
  const int64_t* idx = in.idx();
  auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opt = x.options().dtype(acc_type);
  at::Tensor lse = at::empty({dm.n}, opt), target = at::empty({dm.n}, opt),
             sum_z = at::empty({dm.n}, opt), max_z = at::empty({dm.n}, opt),
             argmax = at::empty({dm.n}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpp_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto mp = make_margin<acc_t>(s, m1, m2, m3, wrap_mode, grad_mode, normalize, softcap,
                                 interclass);
    const scalar_t* bias = in.bias.has_value() ? in.bias->data_ptr<scalar_t>() : nullptr;
    fwd_kernel<scalar_t, acc_t>(x, w, labels, idx, bias, mp, dm, block, lse, target, sum_z,
                                max_z, argmax);
  });
  return {lse, target, sum_z, max_z, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpp_bwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& index_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& lse_in, const at::Tensor& gp_in, const at::Tensor& gt_in,
    const at::Tensor& gs_in, double s, double m1, double m2, double m3, int64_t wrap_mode,
    int64_t grad_mode, bool normalize, int64_t sub_centers, double softcap,
    double interclass, double grad_filter, int64_t block) {
  Dims dm = check_bwd_args(x_in, w_in, labels_in, index_in, bias_in, lse_in, gp_in, gt_in,
                           gs_in, s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers,
                           softcap, interclass, grad_filter, block);
  check_cpu(x_in);
  check_values(labels_in, index_in, dm);
  const ContiguousInputs in = make_contiguous(x_in, w_in, labels_in, index_in, bias_in);
  const at::Tensor &x = in.x, &w = in.w, &labels = in.labels;
  const int64_t* idx = in.idx();
  auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto vec = [&](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
  at::Tensor lse = vec(lse_in), gp = vec(gp_in), gt = vec(gt_in), gs = vec(gs_in);
  at::Tensor dx = at::empty({dm.n, dm.d}, x.options());
  at::Tensor dw = at::zeros({dm.r, dm.d}, w.options());
  // dbias: [R / K] in bias's dtype (zeros outside the shard), or empty without a bias
  at::Tensor dbias = in.bias.has_value() ? at::zeros({dm.r / dm.k}, in.bias->options())
                                         : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpp_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto mp = make_margin<acc_t>(s, m1, m2, m3, wrap_mode, grad_mode, normalize, softcap,
                                 interclass);
    const scalar_t* bias = in.bias.has_value() ? in.bias->data_ptr<scalar_t>() : nullptr;
    bwd_kernel<scalar_t, acc_t>(x, w, labels, idx, bias, lse, gp, gt, gs, mp, dm, block, dx,
                                dw, dbias);
  });
  return {dx, dw, dbias};
}

}  // namespace
}  // namespace arcface

TORCH_LIBRARY_IMPL(arcface_kernels, CPU, m) {
  m.impl("cpp_fwd", &arcface::cpp_fwd_cpu);
  m.impl("cpp_bwd", &arcface::cpp_bwd_cpu);
}
