// CPU kernel of the forward / backward primitive (arcface_kernels/_ops.py).
//
// The shard's classes are walked in blocks of BC classes (BC*K rows of w, ~2048 rows)
// and the rows in tiles of BN (a tile holds <= kTileElements values):
//   * the block's rows of w are gathered (through index when given), converted to the
//     accumulation type and normalized: ws [BC*K, D], b [BC*K] (parallel over its rows);
//   * S = xs_tile @ ws^T on the bounded [BN, BC*K] tile (at::mm_out: multi-threaded BLAS);
//   * the per-element math of arcface_math.h runs in at::parallel_for over the tile's
//     rows: each row's online-lse state (forward) or its gradient coefficients G
//     (backward, in place in S) belong to one thread; the per-class sums q of the backward
//     are per-thread partials added after the loop;
//   * backward: dX_acc[tile] += G @ ws and dW_block += G^T @ xs_tile (BLAS), then the
//     block's rows of dw are finished in parallel over the block's rows.
// The blocks run one after another, so BLAS is never called inside a parallel region
// (nested OpenMP teams oversubscribe the cores). Nothing of size N x C is held: memory
// is O(N*D + BN*BC*K + BC*K*D + threads*BC*K). Results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../arcface_math.h"
#include "../ops.h"

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
#define AK_ISA_ENTRY(NAME, ARGS)                                                  \
  AK_CPU_CLONES void NAME##_f32(const ARGS<float>& a, int64_t i0, int64_t i1) {   \
    NAME<float>(a, i0, i1);                                                       \
  }                                                                               \
  inline void NAME##_isa(const ARGS<float>& a, int64_t i0, int64_t i1) {          \
    NAME##_f32(a, i0, i1);                                                        \
  }                                                                               \
  inline void NAME##_isa(const ARGS<double>& a, int64_t i0, int64_t i1) {         \
    NAME<double>(a, i0, i1);                                                      \
  }


constexpr int64_t kWRowsPerBlock = 2048;
constexpr int64_t kTileElements = int64_t(1) << 19;

struct Plan {
  int64_t bc;    // classes per block
  int64_t bn;    // rows per tile
  int64_t nblk;  // class blocks
};

Plan make_plan(const Dims& dm, int64_t block) {
  Plan p;
  p.bc = block > 0 ? block : std::max<int64_t>(1, kWRowsPerBlock / dm.k);
  p.bc = std::max<int64_t>(1, std::min(p.bc, std::max<int64_t>(dm.c, 1)));
  p.bn = std::max<int64_t>(1, std::min(dm.n, kTileElements / (p.bc * dm.k)));
  p.nblk = (dm.c + p.bc - 1) / p.bc;
  return p;
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
  const acc_t inv = inv_norm(ss);
  for (int64_t t = 0; t < d; ++t) dst[t] *= inv;
  return inv;
}

// xs = x (as acc_t) normalized by rows (when normalize), and a = 1 / max(|x_i|, eps).
template <typename scalar_t, typename acc_t>
void prepare_rows(const at::Tensor& x, bool normalize, acc_t* xs, acc_t* a, const Dims& dm) {
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::parallel_for(0, dm.n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      a[i] = copy_row(xp + i * dm.d, dm.d, normalize, xs + i * dm.d);
    }
  });
}

// Row of w of shard position `pos`, sub-center k.
inline int64_t w_row(const int64_t* idx, int64_t pos, int64_t k, int64_t K) {
  return (idx ? idx[pos] : pos) * K + k;
}

// Gathers classes [j0, j0 + nc) into ws [nc*K, D] (acc_t, normalized), b [nc*K].
template <typename scalar_t, typename acc_t>
void gather_block(const scalar_t* wp, const int64_t* idx, int64_t j0, int64_t nc,
                  const Dims& dm, bool normalize, acc_t* ws, acc_t* b) {
  at::parallel_for(0, nc * dm.k, 64, [&](int64_t q0, int64_t q1) {
    for (int64_t rr = q0; rr < q1; ++rr) {
      const scalar_t* src = wp + w_row(idx, j0 + rr / dm.k, rr % dm.k, dm.k) * dm.d;
      b[rr] = copy_row(src, dm.d, normalize, ws + rr * dm.d);
    }
  });
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

// Forward state of a tile: the dot products S [bn, nr] and the per-row online state.
template <typename acc_t>
struct FwdRows {
  acc_t* S;
  int64_t nr, nc, K, j0, r0;
  bool first;  // first class block
  const int64_t* lab;
  Margin<acc_t> mp;
  acc_t *st_m, *st_s, *st_b;
  int64_t* st_a;
  acc_t *sz, *tgt;
};

template <typename acc_t>
AK_ALWAYS_INLINE void fwd_rows(const FwdRows<acc_t>& args, int64_t i0, int64_t i1) {
  const FwdRows<acc_t> a = args;  // a local copy: stores through its pointers cannot alias it
  for (int64_t ii = i0; ii < i1; ++ii) {
      const int64_t i = a.r0 + ii;
      acc_t* c = a.S + ii * a.nr;
      row_cosines<acc_t>(c, c, a.nc, a.K, a.mp.normalize, nullptr);
      // sum and max of the cosines (vectorized); NaN shows in the sum
      acc_t csum = 0, cmax = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(+ : csum) reduction(max : cmax)
      for (int64_t j = 0; j < a.nc; ++j) {
        csum += c[j];
        cmax = c[j] > cmax ? c[j] : cmax;
      }
      // the best cosine (no margin) and its first class, NaN first
      int64_t jbest = -1;
      if (csum != csum) {
        for (int64_t j = 0; j < a.nc && jbest < 0; ++j)
          if (c[j] != c[j]) jbest = j;
      }
      if (jbest < 0 && (a.first || better_max(cmax, a.j0, a.st_b[i], a.st_a[i]))) {
        for (int64_t j = 0; j < a.nc && jbest < 0; ++j)
          if (c[j] == cmax) jbest = j;
      }
      if (jbest >= 0 && (a.first || better_max(c[jbest], a.j0 + jbest, a.st_b[i], a.st_a[i]))) {
        a.st_b[i] = c[jbest];
        a.st_a[i] = a.j0 + jbest;
      }
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
        if (csum != csum) tile = lse_merge(tile, Lse<acc_t>{csum, csum});
      }
      const Lse<acc_t> mr = lse_merge(Lse<acc_t>{a.st_m[i], a.st_s[i]}, tile);
      a.st_m[i] = mr.m;
      a.st_s[i] = mr.sum;
      a.sz[i] += zsum;
  }
}

AK_ISA_ENTRY(fwd_rows, FwdRows)

template <typename scalar_t, typename acc_t>
void fwd_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                const int64_t* idx, const Margin<acc_t>& mp, const Dims& dm, int64_t block,
                at::Tensor& lse, at::Tensor& target, at::Tensor& sum_z, at::Tensor& max_z,
                at::Tensor& argmax) {
  const auto acc_opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t N = dm.n, D = dm.d, K = dm.k;
  const Plan pl = make_plan(dm, block);
  at::Tensor xs_t = at::empty({N, D}, acc_opt), a_t = at::empty({N}, acc_opt);
  prepare_rows<scalar_t, acc_t>(x, mp.normalize, xs_t.data_ptr<acc_t>(),
                                a_t.data_ptr<acc_t>(), dm);
  // per-row state: online lse (max, sum) and the best cosine's class
  std::vector<acc_t> st_m(N, -std::numeric_limits<acc_t>::infinity()), st_s(N, acc_t(0));
  std::vector<acc_t> st_b(N, -std::numeric_limits<acc_t>::infinity());
  std::vector<int64_t> st_a(N, 0);
  acc_t* tgt = target.data_ptr<acc_t>();
  acc_t* sz = sum_z.data_ptr<acc_t>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  std::fill(tgt, tgt + N, acc_t(0));
  std::fill(sz, sz + N, acc_t(0));
  at::Tensor ws_t = at::empty({pl.bc * K, D}, acc_opt);
  at::Tensor b_t = at::empty({pl.bc * K}, acc_opt);
  at::Tensor s_t = at::empty({pl.bn * pl.bc * K}, acc_opt);
  acc_t* ws = ws_t.data_ptr<acc_t>();
  acc_t* S = s_t.data_ptr<acc_t>();

  for (int64_t blk = 0; blk < pl.nblk; ++blk) {
    const int64_t j0 = blk * pl.bc, nc = std::min(pl.bc, dm.c - j0), nr = nc * K;
    gather_block<scalar_t, acc_t>(wp, idx, j0, nc, dm, mp.normalize, ws,
                                  b_t.data_ptr<acc_t>());
    at::Tensor wv = ws_t.narrow(0, 0, nr);
    for (int64_t r0 = 0; r0 < N; r0 += pl.bn) {
      const int64_t bn = std::min(pl.bn, N - r0);
      at::Tensor sv = s_t.narrow(0, 0, bn * nr).view({bn, nr});
      at::mm_out(sv, xs_t.narrow(0, r0, bn), wv.t());
      FwdRows<acc_t> fr{S, nr, nc, K, j0, r0, blk == 0, lab, mp, st_m.data(), st_s.data(),
                        st_b.data(), st_a.data(), sz, tgt};
      at::parallel_for(0, bn, 16, [&](int64_t i0, int64_t i1) { fwd_rows_isa(fr, i0, i1); });
    }
  }
  acc_t* lo = lse.data_ptr<acc_t>();
  acc_t* mo = max_z.data_ptr<acc_t>();
  int64_t* ao = argmax.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    lo[i] = lse_value(Lse<acc_t>{st_m[i], st_s[i]});
    mo[i] = mp.s * st_b[i];
    ao[i] = st_a[i];
  }
}

// Backward state of a tile: S [bn, nr] becomes G in place; q [nr] is the calling thread's
// partial of q_j, cbuf / kbuf its scratch for K > 1; r [N] the rows' r_i.
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

template <typename scalar_t, typename acc_t>
void bwd_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                const int64_t* idx, const at::Tensor& lse_t, const at::Tensor& gp_t,
                const at::Tensor& gt_t, const at::Tensor& gs_t, const Margin<acc_t>& mp,
                const Dims& dm, int64_t block, at::Tensor& dx, at::Tensor& dw) {
  const auto acc_opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t N = dm.n, D = dm.d, K = dm.k;
  const Plan pl = make_plan(dm, block);
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor xs_t = at::empty({N, D}, acc_opt), a_t = at::empty({N}, acc_opt);
  prepare_rows<scalar_t, acc_t>(x, mp.normalize, xs_t.data_ptr<acc_t>(),
                                a_t.data_ptr<acc_t>(), dm);
  at::Tensor dxa_t = at::zeros({N, D}, acc_opt);  // sum_j G_ij ws_j
  std::vector<acc_t> r(N, acc_t(0));              // r_i = sum_j G_ij c_ij
  const int64_t* lab = labels.data_ptr<int64_t>();
  const acc_t* lse = lse_t.data_ptr<acc_t>();
  const acc_t* gp = gp_t.data_ptr<acc_t>();
  const acc_t* gt = gt_t.data_ptr<acc_t>();
  const acc_t* gs = gs_t.data_ptr<acc_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  scalar_t* dwp = dw.data_ptr<scalar_t>();
  at::Tensor ws_t = at::empty({pl.bc * K, D}, acc_opt);
  at::Tensor b_t = at::empty({pl.bc * K}, acc_opt);
  at::Tensor s_t = at::empty({pl.bn * pl.bc * K}, acc_opt);
  at::Tensor dwa_t = at::empty({pl.bc * K, D}, acc_opt);
  std::vector<acc_t> qp(T * pl.bc * K);          // per-thread q_j partials
  std::vector<acc_t> cbuf(K > 1 ? T * pl.bc : 0);  // per-thread class cosines (K > 1)
  std::vector<int32_t> kbuf(K > 1 ? T * pl.bc : 0);
  acc_t* ws = ws_t.data_ptr<acc_t>();
  acc_t* bb = b_t.data_ptr<acc_t>();
  acc_t* S = s_t.data_ptr<acc_t>();

  for (int64_t blk = 0; blk < pl.nblk; ++blk) {
    const int64_t j0 = blk * pl.bc, nc = std::min(pl.bc, dm.c - j0), nr = nc * K;
    gather_block<scalar_t, acc_t>(wp, idx, j0, nc, dm, mp.normalize, ws, bb);
    at::Tensor wv = ws_t.narrow(0, 0, nr);
    at::Tensor dwa = dwa_t.narrow(0, 0, nr);
    dwa.zero_();
    std::fill(qp.begin(), qp.end(), acc_t(0));
    for (int64_t r0 = 0; r0 < N; r0 += pl.bn) {
      const int64_t bn = std::min(pl.bn, N - r0);
      at::Tensor sv = s_t.narrow(0, 0, bn * nr).view({bn, nr});
      at::Tensor xv = xs_t.narrow(0, r0, bn);
      at::mm_out(sv, xv, wv.t());
      at::parallel_for(0, bn, 16, [&](int64_t i0, int64_t i1) {
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid >= 0 && tid < T, "thread id ", tid, " out of [0, ", T, ")");
        BwdRows<acc_t> br{S, nr, nc, K, j0, r0, lab, mp, lse, gp, gt, gs,
                          qp.data() + tid * pl.bc * K,
                          K == 1 ? nullptr : cbuf.data() + tid * pl.bc,
                          K == 1 ? nullptr : kbuf.data() + tid * pl.bc, r.data()};
        bwd_rows_isa(br, i0, i1);
      });
      // dX_acc += G @ ws ; dW_block += G^T @ xs
      dxa_t.narrow(0, r0, bn).addmm_(sv, wv);
      dwa.addmm_(sv.t(), xv);
    }
    // the block's rows of dw: b_j (sum_i G_ij xs_i - q_j ws_j)
    const acc_t* da = dwa_t.data_ptr<acc_t>();
    auto finish = [&](int64_t q0, int64_t q1, bool add) {
      for (int64_t rr = q0; rr < q1; ++rr) {
        acc_t qr = 0;
        for (int64_t t = 0; t < T; ++t) qr += qp[t * pl.bc * K + rr];
        scalar_t* dst = dwp + w_row(idx, j0 + rr / K, rr % K, K) * D;
        const acc_t* src = da + rr * D;
        const acc_t* wsr = ws + rr * D;
        const acc_t br = bb[rr];
        for (int64_t t = 0; t < D; ++t) {
          const acc_t v = mp.normalize ? norm_grad(src[t], qr, wsr[t], br) : src[t];
          dst[t] = add ? static_cast<scalar_t>(static_cast<acc_t>(dst[t]) + v)
                       : static_cast<scalar_t>(v);
        }
      }
    };
    if (idx) {
      finish(0, nr, true);  // a class may repeat in index: add, serially
    } else {
      at::parallel_for(0, nr, 16, [&](int64_t q0, int64_t q1) { finish(q0, q1, false); });
    }
  }

  // dx_i = a_i (dX_acc_i - r_i xs_i)
  const acc_t* dxa = dxa_t.data_ptr<acc_t>();
  const acc_t* xs = xs_t.data_ptr<acc_t>();
  const acc_t* a = a_t.data_ptr<acc_t>();
  scalar_t* dxo = dx.data_ptr<scalar_t>();
  at::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t t = 0; t < D; ++t) {
        acc_t v = dxa[i * D + t];
        if (mp.normalize) v = norm_grad(v, r[i], xs[i * D + t], a[i]);
        dxo[i * D + t] = static_cast<scalar_t>(v);
      }
  });
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "the CPU kernel got tensors on ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpp_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& index_in, double s, double m1, double m2, double m3,
    int64_t wrap_mode, int64_t grad_mode, bool normalize, int64_t sub_centers,
    double grad_filter, int64_t block) {
  Dims dm = check_fwd_args(x_in, w_in, labels_in, index_in, s, m1, m2, m3, wrap_mode,
                           grad_mode, normalize, sub_centers, grad_filter, block);
  check_cpu(x_in);
  check_values(labels_in, index_in, dm);
  const ContiguousInputs in = make_contiguous(x_in, w_in, labels_in, index_in);
  const at::Tensor &x = in.x, &w = in.w, &labels = in.labels;
  const int64_t* idx = in.idx();
  auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opt = x.options().dtype(acc_type);
  at::Tensor lse = at::empty({dm.n}, opt), target = at::empty({dm.n}, opt),
             sum_z = at::empty({dm.n}, opt), max_z = at::empty({dm.n}, opt),
             argmax = at::empty({dm.n}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpp_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto mp = make_margin<acc_t>(s, m1, m2, m3, wrap_mode, grad_mode, normalize);
    fwd_kernel<scalar_t, acc_t>(x, w, labels, idx, mp, dm, block, lse, target, sum_z, max_z,
                                argmax);
  });
  return {lse, target, sum_z, max_z, argmax};
}

std::tuple<at::Tensor, at::Tensor> cpp_bwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& index_in, const at::Tensor& lse_in,
    const at::Tensor& gp_in, const at::Tensor& gt_in, const at::Tensor& gs_in, double s,
    double m1, double m2, double m3, int64_t wrap_mode, int64_t grad_mode, bool normalize,
    int64_t sub_centers, double grad_filter, int64_t block) {
  Dims dm = check_bwd_args(x_in, w_in, labels_in, index_in, lse_in, gp_in, gt_in, gs_in, s, m1,
                           m2, m3, wrap_mode, grad_mode, normalize, sub_centers, grad_filter, block);
  check_cpu(x_in);
  check_values(labels_in, index_in, dm);
  const ContiguousInputs in = make_contiguous(x_in, w_in, labels_in, index_in);
  const at::Tensor &x = in.x, &w = in.w, &labels = in.labels;
  const int64_t* idx = in.idx();
  auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto vec = [&](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
  at::Tensor lse = vec(lse_in), gp = vec(gp_in), gt = vec(gt_in), gs = vec(gs_in);
  at::Tensor dx = at::empty({dm.n, dm.d}, x.options());
  at::Tensor dw = at::zeros({dm.r, dm.d}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpp_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto mp = make_margin<acc_t>(s, m1, m2, m3, wrap_mode, grad_mode, normalize);
    bwd_kernel<scalar_t, acc_t>(x, w, labels, idx, lse, gp, gt, gs, mp, dm, block, dx, dw);
  });
  return {dx, dw};
}

}  // namespace
}  // namespace arcface

TORCH_LIBRARY_IMPL(arcface_kernels, CPU, m) {
  m.impl("cpp_fwd", &arcface::cpp_fwd_cpu);
  m.impl("cpp_bwd", &arcface::cpp_bwd_cpu);
}
