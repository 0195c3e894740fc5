// Per-element math of the margin softmax, shared by the CPU and the CUDA kernel.
//
// This header is the single C++/CUDA home of the formulas stated in the docstring of
// arcface_kernels/_math.py (their Python twin there: margin_psi / margin_dpsi,
// NORM_EPS, SIN2_MIN, fallback_threshold). Every function is host+device and templated on the
// accumulation type T (float, or double on the CPU).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define AK_HD __host__ __device__ __forceinline__
#else
#define AK_HD inline
#endif
// AK_HD, and always inlined on the host too: the helpers of the CPU kernel's vectorized
// loops (exp_vec, tanh_vec, the bias / softcap / filter terms), which the translation
// unit's inlining budget would otherwise leave as calls.
#if defined(__CUDACC__)
#define AK_HDI __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define AK_HDI inline __attribute__((always_inline))
#else
#define AK_HDI inline
#endif

namespace arcface {

// Integer codes of the op scalars; equal to arcface_kernels/_config.py WRAP_MODES and
// GRAD_MODES (exported by the module arcface_kernels._C and checked by the tests).
constexpr int64_t WRAP_FALLBACK = 0;
constexpr int64_t WRAP_EASY = 1;
constexpr int64_t WRAP_NONE = 2;
constexpr int64_t GRAD_EXACT = 0;
constexpr int64_t GRAD_STRAIGHT_THROUGH = 1;

constexpr double NORM_EPS = 1e-12;  // as F.normalize
constexpr double SIN2_MIN = 1e-12;  // floor of sin(theta)^2 in psi'(c)
constexpr double PI = 3.14159265358979323846;

template <typename T>
AK_HD T ak_sqrt(T v) { return sqrt(v); }
template <typename T>
AK_HD T ak_exp(T v) { return exp(v); }
template <typename T>
AK_HD T ak_log(T v) { return log(v); }
template <typename T>
AK_HD T ak_cos(T v) { return cos(v); }
template <typename T>
AK_HD T ak_sin(T v) { return sin(v); }
template <typename T>
AK_HD T ak_acos(T v) { return acos(v); }
template <typename T>
AK_HD T ak_tanh(T v) { return tanh(v); }
template <>
AK_HD float ak_sqrt<float>(float v) {
#if defined(__CUDA_ARCH__)
  return sqrtf(v);
#else
  return std::sqrt(v);
#endif
}
template <>
AK_HD float ak_exp<float>(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  return std::exp(v);
#endif
}
template <>
AK_HD float ak_log<float>(float v) {
#if defined(__CUDA_ARCH__)
  return logf(v);
#else
  return std::log(v);
#endif
}
// On the GPU cos / sin go through cospi / sinpi: their argument reduction is exact and
// local (cosf / sinf keep a Payne-Hanek slow path for huge arguments, a call with a
// local-memory array in every kernel that evaluates psi). The arguments here (angles in
// [-pi, 2 pi]) lose at most one rounding of v / pi.
constexpr float kInvPiF = 0.318309886183790671538f;
template <>
AK_HD float ak_cos<float>(float v) {
#if defined(__CUDA_ARCH__)
  return cospif(v * kInvPiF);
#else
  return std::cos(v);
#endif
}
template <>
AK_HD float ak_sin<float>(float v) {
#if defined(__CUDA_ARCH__)
  return sinpif(v * kInvPiF);
#else
  return std::sin(v);
#endif
}
template <>
AK_HD float ak_acos<float>(float v) {
#if defined(__CUDA_ARCH__)
  return acosf(v);
#else
  return std::acos(v);
#endif
}
template <>
AK_HD float ak_tanh<float>(float v) {
#if defined(__CUDA_ARCH__)
  return tanhf(v);
#else
  return std::tanh(v);
#endif
}

// exp(v) for the CPU's hot loops, written so that compilers vectorize it (no calls, no
// branches): Cody-Waite reduction v = n ln2 + r, |r| <= ln2/2, and the degree-6 minimax
// polynomial of Cephes' expf (about 1 ulp in float); 0 below -87 (exp < 1.7e-38),
// inf above 88 (exp > 1.6e38; the kernels only take exp of z - lse <= 0), NaN stays NaN. double, and any device code, use exp itself.
template <typename T>
AK_HDI T exp_vec(T v) {
  return ak_exp(v);
}
template <>
AK_HDI float exp_vec<float>(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  const float hi = 88.0f, lo = -87.0f;
  float x = v > hi ? hi : (v < lo ? lo : v);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  // y * 2^n, with 2^n built from its exponent bits (n in [-126, 127])
  union {
    int32_t i;
    float f;
  } u;
  u.i = (static_cast<int32_t>(n) + 127) << 23;
  y = y * u.f;
  y = v < lo ? 0.0f : y;
  y = v > hi ? std::numeric_limits<float>::infinity() : y;
  return v != v ? v : y;
#endif
}

// tanh(v) for the CPU's hot loops (the softcap), vectorizable like exp_vec: Cephes'
// tanhf, both branches computed and one selected: v + v^3 P(v^2) for |v| <= 0.625, else
// sign(v) (1 - 2 / (exp(2|v|) + 1)) (about 2 ulp in float; +-1 for large |v|, NaN stays
// NaN). double, and any device code, use tanh itself.
template <typename T>
AK_HDI T tanh_vec(T v) {
  return ak_tanh(v);
}
template <>
AK_HDI float tanh_vec<float>(float v) {
#if defined(__CUDA_ARCH__)
  return tanhf(v);
#else
  const float a = v < 0.0f ? -v : v;
  const float e = exp_vec(a + a);
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = v < 0.0f ? -big : big;
  const float z = v * v;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * v + v;
  return a > 0.625f ? big : small;
#endif
}

// The loss scalars, with the constants derived from them computed once on the host (in
// double) and then stored in the accumulation type.
template <typename T>
struct Margin {
  T s, m1, m2, m3;
  T cos_m2, sin_m2;
  T threshold;       // fallback: the branch is taken where c < threshold
  T fallback_shift;  // m2 * sin(m2)
  T softcap;         // z = softcap * tanh(v / softcap); 0 = off
  T interclass;      // non-target cosines above it are dropped (u = 0); 0 = off
  T filter_above;    // interclass when the filter is on, else +inf (branch-free test)
  int wrap, grad;
  bool m1_is_one, normalize;
  bool capped, filter;  // softcap > 0, interclass > 0
};

// cos of the angle past which m1*theta + m2 exceeds pi: cos(min((pi - m2) / m1, pi)).
inline double fallback_threshold(double m1, double m2) {
  double a = (PI - m2) / m1;
  return std::cos(a < PI ? a : PI);
}

template <typename T>
inline Margin<T> make_margin(double s, double m1, double m2, double m3, int64_t wrap,
                             int64_t grad, bool normalize, double softcap,
                             double interclass) {
  Margin<T> p;
  p.s = static_cast<T>(s);
  p.m1 = static_cast<T>(m1);
  p.m2 = static_cast<T>(m2);
  p.m3 = static_cast<T>(m3);
  p.cos_m2 = static_cast<T>(std::cos(m2));
  p.sin_m2 = static_cast<T>(std::sin(m2));
  p.threshold = static_cast<T>(fallback_threshold(m1, m2));
  p.fallback_shift = static_cast<T>(m2 * std::sin(m2));
  p.wrap = static_cast<int>(wrap);
  p.grad = static_cast<int>(grad);
  p.m1_is_one = (m1 == 1.0);
  p.normalize = normalize;
  p.softcap = static_cast<T>(softcap);
  p.interclass = static_cast<T>(interclass);
  p.capped = softcap > 0;
  p.filter = interclass > 0;
  p.filter_above = p.filter ? p.interclass : std::numeric_limits<T>::infinity();
  return p;
}

// 1 / max(norm, eps) from a sum of squares (F.normalize's denominator).
template <typename T>
AK_HD T inv_norm(T sumsq) {
  T n = ak_sqrt(sumsq);
  return T(1) / (n > T(NORM_EPS) ? n : T(NORM_EPS));
}

// 1 / |v| from a row whose sum of squares overflowed: max_abs = max |v_t| (finite) and
// scaled_sumsq = sum (v_t / max_abs)^2 (the norm is then far above NORM_EPS).
template <typename T>
AK_HD T inv_norm_scaled(T max_abs, T scaled_sumsq) {
  return (T(1) / max_abs) / ak_sqrt(scaled_sumsq);
}

// The cosine from a dot product of already-normalized vectors: clamped to [-1, 1] when
// normalizing (NaN passes through), the raw dot product otherwise.
template <typename T>
AK_HD T cosine(T dot, bool normalize) {
  if (!normalize) return dot;
  return dot > T(1) ? T(1) : (dot < T(-1) ? T(-1) : dot);
}

// Whether the target cosine takes the fallback / easy branch.
template <typename T>
AK_HD bool wrapped(T c, const Margin<T>& p) {
  if (p.wrap == WRAP_FALLBACK) return c < p.threshold;
  if (p.wrap == WRAP_EASY) return c <= T(0);
  return false;
}

// psi(c) = cos(m1 * acos(c) + m2) - m3 with the wrap modes (target logit / s).
template <typename T>
AK_HD T psi(T c, const Margin<T>& p) {
  if (wrapped(c, p))
    return c - p.m3 - (p.wrap == WRAP_FALLBACK ? p.fallback_shift : T(0));
  if (p.m1_is_one) {
    T s2 = T(1) - c * c;
    T sin_t = ak_sqrt(s2 > T(0) ? s2 : T(0));
    return c * p.cos_m2 - sin_t * p.sin_m2 - p.m3;
  }
  return ak_cos(p.m1 * ak_acos(c) + p.m2) - p.m3;
}

// psi'(c): exact (finite at c = +-1: sin^2 floored at SIN2_MIN; 1 in the wrapped
// branches) or straight-through (1).
template <typename T>
AK_HD T dpsi(T c, const Margin<T>& p) {
  if (p.grad == GRAD_STRAIGHT_THROUGH) return T(1);
  if (wrapped(c, p)) return T(1);
  T s2 = T(1) - c * c;
  T sin_t = ak_sqrt(s2 > T(SIN2_MIN) ? s2 : T(SIN2_MIN));
  if (p.m1_is_one) return p.cos_m2 + c * p.sin_m2 / sin_t;
  return p.m1 * ak_sin(p.m1 * ak_acos(c) + p.m2) / sin_t;
}

// ---- bias, softcap, interclass filter (the spec of issue 12; docs/design.md section 3) ----
// Per element (row i, shard position j of class g, cosine c after the sub-center max):
//   filtered = !target && interclass > 0 && c > interclass        (NaN: not filtered)
//   u = filtered ? 0 : (target ? psi(c) : c),   v = s u + bias[g],   z = softcap_map(v)

// Cap (the template argument of logit_z, grad_dv): kRuntime tests p.capped; kOff / kOn
// are for callers that have tested it outside their loop (the CPU kernel's loops, which
// then vectorize: no test of a flag inside them).
enum class Cap { kRuntime, kOff, kOn };

// Whether the interclass filter drops a logit (never the target, never NaN; without the
// filter filter_above is +inf, so that nothing is above it).
template <typename T>
AK_HDI bool filtered(T c, bool target, const Margin<T>& p) {
  return !target && c > p.filter_above;
}

// The soft cap z = softcap * tanh(v / softcap) (identity when off).
template <typename T>
AK_HDI T softcap_map(T v, const Margin<T>& p) {
  return p.capped ? p.softcap * tanh_vec(v / p.softcap) : v;
}

// Its derivative dz/dv = 1 - tanh(v / softcap)^2 (1 when off).
template <typename T>
AK_HDI T softcap_grad(T v, const Margin<T>& p) {
  if (!p.capped) return T(1);
  const T t = tanh_vec(v / p.softcap);
  return T(1) - t * t;
}

// v = s u + bias: the logit before the cap.
template <typename T>
AK_HDI T logit_v(T c, bool target, T bias, const Margin<T>& p) {
  const T u = target ? psi(c, p) : (filtered(c, false, p) ? T(0) : c);
  return p.s * u + bias;
}

// z: the logit the softmax sees.
template <Cap kCap = Cap::kRuntime, typename T>
AK_HDI T logit_z(T c, bool target, T bias, const Margin<T>& p) {
  const T v = logit_v(c, target, bias, p);
  if (kCap == Cap::kOff) return v;
  if (kCap == Cap::kOn) return p.softcap * tanh_vec(v / p.softcap);
  return softcap_map(v, p);
}

// The backward of one element with the terms above, in two steps (two scalar results
// keep the CPU loops vectorizable):
//   grad_dv: dL/dv = dL/dz * softcap'(v), dL/dz = g_p exp(z - lse) + g_s + g_t [target]
//            (the element's share of dbias[g]; also where filtered, v = bias there);
//   grad_c:  G = dL/dc = filtered ? 0 : s dL/dv (psi'(c) at the target, else 1).
// Without bias, cap and filter G equals grad_nontarget / grad_target.
template <Cap kCap = Cap::kRuntime, typename T>
AK_HDI T grad_dv(T c, bool target, T bias, T lse, T g_p, T g_t, T g_s, const Margin<T>& p) {
  const T v = logit_v(c, target, bias, p);
  T z = v, tp = T(1);
  if (kCap == Cap::kOn || (kCap == Cap::kRuntime && p.capped)) {
    const T t = tanh_vec(v / p.softcap);
    z = p.softcap * t;
    tp = T(1) - t * t;
  }
  const T dz = target ? g_p * ak_exp(z - lse) + g_s + g_t : g_p * exp_vec(z - lse) + g_s;
  return dz * tp;
}

template <typename T>
AK_HDI T grad_c(T c, bool target, T dv, const Margin<T>& p) {
  if (filtered(c, target, p)) return T(0);
  return target ? p.s * dv * dpsi(c, p) : p.s * dv;
}

// Online log-sum-exp state: sum of exp(z - m). Empty: m = -inf, sum = 0.
template <typename T>
struct Lse {
  T m;
  T sum;
};

template <typename T>
AK_HD Lse<T> lse_empty() {
  return Lse<T>{-std::numeric_limits<T>::infinity(), T(0)};
}

// Merge two partial states (NaN propagates; two empty states stay empty).
template <typename T>
AK_HD Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  if (a.m != a.m || b.m != b.m) {
    T nan = std::numeric_limits<T>::quiet_NaN();
    return Lse<T>{nan, nan};
  }
  T m = a.m > b.m ? a.m : b.m;
  if (m == -std::numeric_limits<T>::infinity()) return lse_empty<T>();
  return Lse<T>{m, a.sum * ak_exp(a.m - m) + b.sum * ak_exp(b.m - m)};
}

// Add one logit z to an online state: a larger z, or a NaN (which then sticks), becomes
// the new max; a z of -inf adds nothing, also to an empty state, where the plain update
// exp(z - m) would be exp(-inf - -inf) = NaN (-inf logits arise with normalize=False).
template <typename T>
AK_HD void lse_push(Lse<T>& st, T z) {
  if (z > st.m || z != z) {
    st.sum = st.sum * ak_exp(st.m - z) + T(1);
    st.m = z;
  } else if (z != -std::numeric_limits<T>::infinity()) {
    st.sum += ak_exp(z - st.m);
  }
}

template <typename T>
AK_HD T lse_value(Lse<T> a) {
  return a.m + ak_log(a.sum);
}

// Better cosine for the argmax: larger, or equal at a lower class (first occurrence, as
// torch.max), NaN sticks.
template <typename T>
AK_HD bool better_max(T c, int64_t j, T best, int64_t best_j) {
  if (best != best) return false;
  if (c != c) return true;
  return c > best || (c == best && j < best_j);
}

// The backward's per-element scaling: G = dL/dc = s * dL/dz * (psi'(c) at the target, 1
// elsewhere), with dL/dz = g_p * exp(z - lse) + g_s + g_t [target].
template <typename T>
AK_HD T grad_nontarget(T z, T lse, T g_p, T g_s, T s) {
  return s * (g_p * exp_vec(z - lse) + g_s);
}

template <typename T>
AK_HD T grad_target(T c, T lse, T g_p, T g_t, T g_s, const Margin<T>& p) {
  T z = p.s * psi(c, p);
  return p.s * (g_p * ak_exp(z - lse) + g_s + g_t) * dpsi(c, p);
}

// The normalization's backward, one element: with u = sum of G times the other side's
// normalized vectors (sum_j G_ij w_hat_j for x_i, sum_i G_ij x_hat_i for w_j), rc the
// row's coefficient (r_i = sum_j G_ij c_ij, or q_j), v_hat the normalized input element
// and inv its row's inverse norm: dL/dv = inv * (u - rc * v_hat) (docs/design.md section 2),
// without the radial term for a row whose norm is below NORM_EPS (inv = 1 / NORM_EPS:
// there v / eps is linear in v).
// norm_grad without its outer factor inv: for u and rc that already carry it (u_s = inv u,
// rc_s = inv rc: the CUDA backward's G can carry the inverse norms of w's rows).
template <typename T>
AK_HD T norm_grad_prescaled(T u_s, T rc_s, T v_hat, T inv) {
  const bool radial = inv < T(1) / T(NORM_EPS);
  return radial ? u_s - rc_s * v_hat : u_s;
}
template <typename T>
AK_HD T norm_grad(T u, T rc, T v_hat, T inv) {
  return inv * norm_grad_prescaled(u, rc, v_hat, inv);
}

}  // namespace arcface
