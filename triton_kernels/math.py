"""Per-element math of the margin softmax in Triton: the one Triton home of these formulas.

The Triton twin of ``arcface_kernels/_math.py`` (margin_psi, margin_dpsi,
fallback_threshold, NORM_EPS, SIN2_MIN) and of the online log-sum-exp merge. Every
Triton kernel of this package imports its math from here; nothing else in the package
writes psi, psi' or an lse merge.

All functions compute in the dtype of their arguments (float32 for fp16/bf16/fp32
inputs, float64 for float64 inputs). The margins arrive as scalars loaded from a float64
parameter tensor and cast to that dtype, so that float64 inputs keep float64 margins.

Integer codes (``WRAP_*``, ``GRAD_*``) equal ``arcface_kernels._config.WRAP_MODES`` /
``GRAD_MODES``; tests/test_triton.py checks that.
"""
import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-12)   # as F.normalize (_math.NORM_EPS)
SIN2_MIN = tl.constexpr(1e-12)   # floor of sin(theta)^2 in psi' (_math.SIN2_MIN)
PI = tl.constexpr(3.141592653589793)
_LOG2E = tl.constexpr(1.4426950408889634)   # log2(e)
_LN2 = tl.constexpr(0.6931471805599453)     # ln(2)

WRAP_FALLBACK = tl.constexpr(0)
WRAP_EASY = tl.constexpr(1)
WRAP_NONE = tl.constexpr(2)
GRAD_EXACT = tl.constexpr(0)
GRAD_STRAIGHT = tl.constexpr(1)


@triton.jit
def _const_like(x, value: tl.constexpr):
    """The constant ``value`` with x's shape and dtype, built directly in that dtype.

    Triton before weakly typed Python scalars (3.0 and, by its semantic.py, releases
    of that time) turns a Python float into a float32 constant and widens it to float64
    afterwards, so ``PI - theta`` in float64 would use pi rounded to float32 (8.7e-8
    off, far above the 1e-10 the float64 tests allow). tl.full builds the constant in
    the requested dtype in every version (and in the interpreter)."""
    return tl.full(x.shape, value, x.dtype)


# Newton steps of the arc-sine below: the start is within 5e-3 of the root and each step
# squares the error, so 4 steps reach float64 round-off.
_ASIN_NEWTON_STEPS = tl.constexpr(4)


@triton.jit
def _asin_small(t):
    """asin(t) for t in [0, sqrt(1/2)]: series start, then Newton on sin(phi) = t
    (cos(phi) >= 0.7 there, so every step is well conditioned)."""
    t2 = t * t
    phi = t * (1.0 + t2 * (1.0 / 6.0 + t2 * (3.0 / 40.0)))
    for _ in tl.static_range(_ASIN_NEWTON_STEPS):
        phi = phi - (tl.sin(phi) - t) / tl.cos(phi)
    return phi


@triton.jit
def acos(c):
    """arc-cosine of c in [-1, 1] from sin/cos/sqrt only (Triton has no acos that also
    runs in the interpreter): acos(c) = 2 asin(sqrt((1 - c) / 2)) for c >= 0 and
    pi - acos(-c) below, accurate to a few ulp in float32 and float64."""
    ac = tl.abs(c)
    half = tl.sqrt(tl.maximum((1.0 - ac) * 0.5, 0.0))
    theta = 2.0 * _asin_small(half)
    return tl.where(c < 0, _const_like(theta, PI) - theta, theta)


@triton.jit
def fallback_threshold(m1, m2):
    """cos of the angle past which m1*theta + m2 exceeds pi (fallback mode)."""
    pi = _const_like(m2, PI)
    return tl.cos(tl.minimum((pi - m2) / m1, pi))


@triton.jit
def _wrapped(c, m1, m2, WRAP: tl.constexpr):
    """Mask of the target cosines taking the fallback / easy branch (False for none)."""
    if WRAP == WRAP_FALLBACK:
        branch = c < fallback_threshold(m1, m2)
    elif WRAP == WRAP_EASY:
        branch = c <= 0.0
    else:
        branch = c < float("-inf")  # never: formula as written
    return branch


@triton.jit
def margin_psi(c, m1, m2, m3, WRAP: tl.constexpr, M1_IS_ONE: tl.constexpr):
    """psi(c) = cos(m1 acos(c) + m2) - m3 with the wrap modes (_math.margin_psi).
    M1_IS_ONE (m1 == 1.0 exactly, as the reference tests it): no arc-cosine."""
    if M1_IS_ONE:
        sin_t = tl.sqrt(tl.maximum(1.0 - c * c, 0.0))
        psi = c * tl.cos(m2) - sin_t * tl.sin(m2) - m3
    else:
        psi = tl.cos(m1 * acos(c) + m2) - m3
    if WRAP == WRAP_FALLBACK:
        psi = tl.where(_wrapped(c, m1, m2, WRAP), c - m3 - m2 * tl.sin(m2), psi)
    elif WRAP == WRAP_EASY:
        psi = tl.where(_wrapped(c, m1, m2, WRAP), c - m3, psi)
    return psi


@triton.jit
def margin_dpsi(c, m1, m2, WRAP: tl.constexpr, GRAD: tl.constexpr, M1_IS_ONE: tl.constexpr):
    """psi'(c) of docs/design.md section 2 (_math.margin_dpsi): exact, with sin(theta)
    floored at sqrt(SIN2_MIN), 1 in the wrapped branches; 1 for straight-through."""
    if GRAD == GRAD_STRAIGHT:
        d = tl.full(c.shape, 1.0, c.dtype)
    else:
        sin_t = tl.sqrt(tl.maximum(1.0 - c * c, _const_like(c, SIN2_MIN)))
        if M1_IS_ONE:
            d = tl.cos(m2) + c * tl.sin(m2) / sin_t
        else:
            d = m1 * tl.sin(m1 * acos(c) + m2) / sin_t
        if WRAP != WRAP_NONE:
            d = tl.where(_wrapped(c, m1, m2, WRAP), 1.0, d)
    return d


@triton.jit
def to_base2(z):
    """z log2(e): logits in base 2, so that exp(z - m) = exp2(y - m log2 e)."""
    return z * _const_like(z, _LOG2E)


@triton.jit
def from_base2(y):
    """y ln(2): back from base 2 (a log2-sum-exp2 becomes a log-sum-exp)."""
    return y * _const_like(y, _LN2)


@triton.jit
def clamp_unit(c):
    """clamp(c, -1, 1) that keeps NaN (comparisons with NaN are False)."""
    return tl.where(c > 1.0, 1.0, tl.where(c < -1.0, -1.0, c))


@triton.jit
def inv_norm(sum_sq):
    """1 / max(sqrt(sum_sq), NORM_EPS), as F.normalize."""
    return 1.0 / tl.maximum(tl.sqrt(sum_sq), _const_like(sum_sq, NORM_EPS))


@triton.jit
def radial(q, inv):
    """A row's radial coefficient q where its norm is above NORM_EPS, else 0 (below the
    floor v / eps is linear in v: no radial term; inv = 1 / max(|v|, NORM_EPS))."""
    return tl.where(inv < 1.0 / _const_like(inv, NORM_EPS), q, 0.0)


@triton.jit
def _safe_max(m):
    """A finite stand-in for a running max of -inf (nothing seen yet): exp(-inf - 0) = 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def lse_update(run_max, run_sum, z):
    """Online log-sum-exp: fold a tile z [BN, BC] (-inf where masked) into the running
    (max [BN], sum of exp(z - max) [BN])."""
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    ref = _safe_max(new_max)
    run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(z - ref[:, None]), axis=1)
    return new_max, run_sum


@triton.jit
def lse_merge(max_a, sum_a, max_b, sum_b):
    """Merge two partial (max, sum of exp(. - max)) pairs of disjoint class sets."""
    new_max = tl.maximum(max_a, max_b)
    ref = _safe_max(new_max)
    return new_max, sum_a * tl.exp(max_a - ref) + sum_b * tl.exp(max_b - ref)


@triton.jit
def lse_finish(run_max, run_sum):
    """log sum exp from the (max, sum) pair: -inf when there were no classes."""
    return _safe_max(run_max) + tl.log(run_sum)


# --- the new logit terms (docs/design.md section 3: u, v = s u + bias, z = T(v)) -------
@triton.jit
def _tanh_parts(a):
    """(tanh |a|, 1 - tanh(a)^2) from u = exp(-2|a|) and one reciprocal: (1 - u) / (1 + u)
    and 4u / (1 + u)^2. No overflow (u <= 1): huge |a| gives (1, 0), NaN gives NaN. The
    tanh is accurate to a few ulp of 1 (an absolute error, all that a logit's tanh needs:
    the soft cap's error is then a few ulp of the cap); 1 - tanh^2 is accurate relatively
    (no cancellation)."""
    u = tl.exp(-2.0 * tl.abs(a))
    r = 1.0 / (1.0 + u)
    return (1.0 - u) * r, 4.0 * u * r * r


@triton.jit
def tanh(a):
    """tanh(a) from exp only (Triton has no tanh that also runs in the interpreter):
    sign(a) (1 - u) / (1 + u), u = exp(-2|a|) (see _tanh_parts)."""
    t, _d = _tanh_parts(a)
    return tl.where(a < 0, -t, t)


@triton.jit
def softcap(v, cap, inv_cap):
    """The soft cap z = cap tanh(v / cap) (Gemma 2; _math.softcap_map), given
    inv_cap = 1 / cap. It is scale-equivariant: base-2 logits (v log2 e) are capped at
    cap log2 e."""
    return cap * tanh(v * inv_cap)


@triton.jit
def softcap_grad(v, inv_cap):
    """dz/dv of :func:`softcap`: 1 - tanh(v / cap)^2 (_math.softcap_grad), as 4u / (1 +
    u)^2: 0 (not NaN) for huge |v|, NaN for NaN."""
    _t, d = _tanh_parts(v * inv_cap)
    return d


@triton.jit
def softcap_and_grad(v, cap, inv_cap):
    """(softcap(v), softcap_grad(v)) from one exponential (z bitwise equal to
    :func:`softcap`'s)."""
    a = v * inv_cap
    t, d = _tanh_parts(a)
    return cap * tl.where(a < 0, -t, t), d


@triton.jit
def interclass_filtered(c, is_target, threshold):
    """insightface's interclass filter (_math.interclass_filtered): a non-target value
    above the threshold counts as 0, in value and gradient. NaN is never filtered. c and
    threshold may be in any common positive scale (the tiles compare base-2 logits s c
    log2 e with s t log2 e)."""
    return (c > threshold) & (is_target == 0)
