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
template <>
AK_HD float ak_cos<float>(float v) {
#if defined(__CUDA_ARCH__)
  return cosf(v);
#else
  return std::cos(v);
#endif
}
template <>
AK_HD float ak_sin<float>(float v) {
#if defined(__CUDA_ARCH__)
  return sinf(v);
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

// exp(v) for the CPU's hot loops, written so that compilers vectorize it (no calls, no
// branches): Cody-Waite reduction v = n ln2 + r, |r| <= ln2/2, and the degree-6 minimax
// polynomial of Cephes' expf (about 1 ulp in float); 0 below -87 (exp < 1.7e-38),
// inf above 88 (exp > 1.6e38; the kernels only take exp of z - lse <= 0), NaN stays NaN. double, and any device code, use exp itself.
template <typename T>
AK_HD T exp_vec(T v) {
  return ak_exp(v);
}
template <>
AK_HD float exp_vec<float>(float v) {
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

// The loss scalars, with the constants derived from them computed once on the host (in
// double) and then stored in the accumulation type.
template <typename T>
struct Margin {
  T s, m1, m2, m3;
  T cos_m2, sin_m2;
  T threshold;       // fallback: the branch is taken where c < threshold
  T fallback_shift;  // m2 * sin(m2)
  int wrap, grad;
  bool m1_is_one, normalize;
};

// cos of the angle past which m1*theta + m2 exceeds pi: cos(min((pi - m2) / m1, pi)).
inline double fallback_threshold(double m1, double m2) {
  double a = (PI - m2) / m1;
  return std::cos(a < PI ? a : PI);
}

template <typename T>
inline Margin<T> make_margin(double s, double m1, double m2, double m3, int64_t wrap,
                             int64_t grad, bool normalize) {
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
  return p;
}

// 1 / max(norm, eps) from a sum of squares (F.normalize's denominator).
template <typename T>
AK_HD T inv_norm(T sumsq) {
  T n = ak_sqrt(sumsq);
  return T(1) / (n > T(NORM_EPS) ? n : T(NORM_EPS));
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
template <typename T>
AK_HD T norm_grad(T u, T rc, T v_hat, T inv) {
  const bool radial = inv < T(1) / T(NORM_EPS);
  return inv * (radial ? u - rc * v_hat : u);
}

}  // namespace arcface
