"""The grid of cases of :mod:`arcface_kernels.testing` and the inputs each case builds.

A :class:`Case` is a shape (N, C, D), the loss settings it passes (keyword arguments in
the vocabulary of :func:`arcface_kernels.arcface_loss`) and an input pattern: how the
embeddings sit with respect to their class centres. Every pattern is built in float64
from the case's seed; :func:`build_inputs` then rounds it to the dtype under test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor

#: Every setting a margin-loss case may pass, with the value it has when a case does not
#: set it (those of :func:`arcface_kernels.arcface_loss`).
DEFAULTS: Dict[str, object] = dict(
    s=64.0, m1=1.0, m2=0.5, m3=0.0, margin_mode="fallback", target_grad="exact",
    normalize=True, sub_centers=1, label_smoothing=0.0, ignore_index=-100,
    reduction="mean")

#: The settings of a plain linear cross-entropy case (``check_linear_cross_entropy``).
LINEAR_DEFAULTS: Dict[str, object] = dict(
    ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None, shift=False)

#: Patterns whose labels hold ignore_index rows: a case with one needs ignore_index.
IGNORING_PATTERNS = ("aligned_ignored", "all_ignored")

PATTERNS = ("aligned", "aligned_ignored", "all_ignored", "random", "near_pi", "parallel",
            "antiparallel", "wrap_point", "zero_rows", "huge_norms", "tiny_norms",
            "duplicate_rows", "sub_center_flip", "sequence")


@dataclass(frozen=True)
class Case:
    """One check: shape, settings (only those that differ from the defaults) and the
    input pattern. ``name`` is what a report shows."""

    name: str
    shape: Tuple[int, int, int]
    settings: Mapping[str, object] = field(default_factory=dict)
    pattern: str = "aligned"
    seed: int = 0
    gradcheck: bool = False  # also run torch.autograd.gradcheck in float64

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        n, c, d = self.shape
        if min(n, c, d) < 1:
            raise ValueError(f"shape must be positive (N, C, D), got {self.shape}")

    def full_settings(self, defaults: Mapping[str, object] = DEFAULTS) -> Dict[str, object]:
        out = dict(defaults)
        out.update(self.settings)
        return out

    def describe(self) -> str:
        n, c, d = self.shape
        sets = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"N={n} C={c} D={d} pattern={self.pattern}" + (f" {sets}" if sets else "")


def _c(name, shape, pattern="aligned", gradcheck=False, **settings) -> Case:
    return Case(name, shape, settings, pattern, gradcheck=gradcheck)


#: The margin-loss grid: every margin family and wrap mode, both target gradients,
#: smoothing, ignore_index and the reductions, odd shapes, and adversarial inputs.
MARGIN_GRID: List[Case] = [
    # margin families and wrap modes
    _c("arcface", (9, 13, 17), gradcheck=True, s=4.0, m2=0.3),
    _c("arcface_s64", (33, 70, 24)),
    _c("cosface", (33, 70, 24), m2=0.0, m3=0.35),
    _c("combined", (33, 70, 24), s=32.0, m2=0.3, m3=0.2),
    _c("sphereface", (9, 13, 17), gradcheck=True, s=8.0, m1=1.35, m2=0.0),
    _c("combined_m1", (9, 13, 17), s=16.0, m1=1.2, m2=0.3, m3=0.1, margin_mode="none"),
    _c("m1_below_1_near_pi", (12, 7, 5), "near_pi", s=16.0, m1=0.8, m2=0.3),
    _c("m1_below_1_near_pi_none", (12, 7, 5), "near_pi", s=16.0, m1=0.8, m2=0.3,
       margin_mode="none"),
    _c("easy", (33, 70, 24), margin_mode="easy"),
    _c("no_wrap", (33, 70, 24), margin_mode="none"),
    _c("big_margin_fallback", (33, 70, 24), s=8.0, m2=2.5),
    _c("wrap_point", (10, 6, 7), "wrap_point", s=16.0, m2=0.5),
    _c("wrap_point_m1", (10, 6, 7), "wrap_point", s=16.0, m1=1.2, m2=0.3),
    _c("straight_through", (33, 70, 24), target_grad="straight_through"),
    # smoothing, ignore_index, reductions
    _c("ignore_mean", (12, 9, 8), "aligned_ignored"),
    _c("smoothing", (33, 70, 24), "aligned_ignored", label_smoothing=0.1),
    _c("ignore_index", (12, 9, 8), "aligned_ignored", ignore_index=-1),
    _c("all_ignored", (6, 9, 8), "all_ignored"),
    _c("reduction_sum", (33, 70, 24), "aligned_ignored", reduction="sum"),
    _c("reduction_none", (33, 70, 24), "aligned_ignored", reduction="none"),
    # sub-centers
    _c("sub_centers", (33, 70, 24), sub_centers=3),
    _c("sub_center_flip", (8, 5, 6), "sub_center_flip", s=16.0, m2=0.5, sub_centers=3,
       margin_mode="none"),
    # without normalization: unbounded logits, additive margin only
    _c("linear_ce", (33, 70, 24), s=1.0, m2=0.0, normalize=False),
    _c("linear_cosface", (33, 70, 24), s=2.0, m2=0.0, m3=0.5, normalize=False),
    # odd shapes
    _c("shape_1x1x1", (1, 1, 1)),
    _c("one_row", (1, 7, 17)),
    _c("one_class", (5, 1, 4)),
    _c("odd_sizes", (64, 129, 33)),
    # adversarial inputs
    _c("parallel", (6, 5, 7), "parallel"),
    _c("parallel_m1", (6, 5, 7), "parallel", s=16.0, m1=0.8, m2=0.3),
    _c("antiparallel", (6, 5, 7), "antiparallel", margin_mode="none"),
    _c("antiparallel_m1", (6, 5, 7), "antiparallel", s=16.0, m1=1.35, m2=0.0),
    _c("zero_rows", (8, 6, 5), "zero_rows"),
    _c("huge_norms", (8, 11, 6), "huge_norms"),
    _c("tiny_norms", (8, 11, 6), "tiny_norms"),
    # norms below the 1e-12 floor of the inverse norm (float32's tiny scale): there
    # v / eps is linear in v and the gradient has no radial term
    _c("below_norm_floor", (3, 44, 31), "tiny_norms", s=1.0, m2=0.0),
    _c("duplicate_rows", (8, 11, 6), "duplicate_rows"),
]

#: Cases of plain linear cross-entropy without margins (normalize=False, s=1, m2=0).
LINEAR_GRID: List[Case] = [
    _c("linear_ce", (33, 70, 24), "aligned_ignored", gradcheck=True),
    _c("linear_one_row", (1, 7, 17)),
    _c("linear_one_class", (5, 1, 4)),
    _c("linear_sum", (12, 9, 8), "aligned_ignored", reduction="sum"),
    _c("linear_none", (12, 9, 8), "aligned_ignored", reduction="none"),
    _c("linear_ignore_index", (12, 9, 8), "aligned_ignored", ignore_index=-1),
    _c("linear_all_ignored", (6, 9, 8), "all_ignored"),
    _c("linear_smoothing", (12, 9, 8), "aligned_ignored", label_smoothing=0.1),
    _c("linear_softcap", (12, 9, 8), "huge_norms", softcap=30.0),
    _c("linear_shift", (12, 9, 8), "sequence", shift=True),
    _c("linear_large_logits", (8, 11, 6), "huge_norms"),
]

# Norm scales of the huge / tiny patterns per dtype: as far out as the dtype's range
# allows for a dot product of two such vectors (float16: its 65504 ceiling).
_HUGE = {torch.float64: 1e30, torch.float32: 1e17, torch.bfloat16: 1e17, torch.float16: 30.0}
_TINY = {torch.float64: 1e-30, torch.float32: 1e-15, torch.bfloat16: 1e-15,
         torch.float16: 1e-2}


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def _orthogonal_unit(u: Tensor, g: torch.Generator) -> Tensor:
    """A random unit vector orthogonal to the unit vector u (any unit vector when D=1
    is impossible: then zeros)."""
    if u.shape[-1] == 1:
        return torch.zeros_like(u)
    v = torch.randn(u.shape, generator=g, dtype=torch.float64)
    v = v - (v * u).sum(-1, keepdim=True) * u
    return _unit(v)


def _at_angle(u: Tensor, theta: float, r: float, g: torch.Generator) -> Tensor:
    """A vector of norm r at angle theta from the unit vector u."""
    v = _orthogonal_unit(u, g)
    return r * (math.cos(theta) * u + math.sin(theta) * v)


def wrap_angle(settings: Mapping[str, object]) -> float:
    """The target angle at which m1 theta + m2 reaches pi (the fallback threshold)."""
    m1, m2 = float(settings.get("m1", 1.0)), float(settings.get("m2", 0.0))
    return min((math.pi - m2) / m1, math.pi)


def build_inputs(case: Case, dtype: torch.dtype = torch.float64,
                 defaults: Mapping[str, object] = DEFAULTS
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """(embeddings, weight, labels) of ``case``, rounded to ``dtype`` (labels int64).

    embeddings [N, D] (for the "sequence" pattern [B=2, N/2, D] and labels [2, N/2]),
    weight [C * sub_centers, D]."""
    st = case.full_settings(defaults)
    n, c, d = case.shape
    k = int(st.get("sub_centers", 1))
    ign = int(st.get("ignore_index", -100))
    g = torch.Generator().manual_seed(1000 + case.seed)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    centre = w.view(c, k, d)[y, 0]                       # each row's target (first) centre
    p = case.pattern
    if p in ("aligned", "aligned_ignored", "all_ignored", "huge_norms", "tiny_norms",
             "duplicate_rows", "zero_rows", "sequence"):
        # lean toward the target centre, from pointing away to close: target cosines
        # over the whole range, both margin branches
        lean = torch.linspace(-2.0, 3.0, n, dtype=torch.float64).unsqueeze(1)
        x = x + lean * centre / w.norm(dim=1).mean()
    if p == "aligned_ignored" and n > 2:
        y[1::4] = ign
    elif p == "all_ignored":
        y[:] = ign
    elif p in ("near_pi", "wrap_point"):
        if p == "near_pi":
            offsets = [0.0, 1e-7, 1e-4, 1e-2, 0.1, 0.3, 0.6]
            angles = [math.pi - o for o in offsets]
        else:
            # just either side of the threshold: exactly at it, rounding alone decides
            # the branch of a discontinuous psi (fallback), so no two correct
            # implementations need agree there
            t = wrap_angle(st)
            angles = [t - 1e-5, t + 1e-5, t - 1e-3, t + 1e-3, t - 0.02, t + 0.02]
            angles = [min(a, math.pi) for a in angles]
        for i in range(n):
            u = _unit(centre[i])
            x[i] = _at_angle(u, angles[i % len(angles)], 1.5 + 0.1 * i, g)
    elif p == "parallel":
        x = 2.5 * centre
    elif p == "antiparallel":
        x = -1.5 * centre
    elif p == "sub_center_flip":
        # the target's sub-centres at pi - 0.1, pi - 0.3, pi - 0.6 from the row: the
        # largest cosine (pi - 0.6) is not the largest margin logit once m1 theta + m2
        # passes pi, so a max taken after the margin differs from one taken before
        for i in range(n):
            xi = _unit(x[i])
            for j, off in enumerate((0.1, 0.3, 0.6)[:k]):
                w[y[i] * k + j] = _at_angle(xi, math.pi - off, 1.0 + 0.2 * j, g)
    if p == "zero_rows":
        x[0] = 0.0
        if n > 1:
            w[y[1] * k:(y[1] + 1) * k] = 0.0       # a target's class centre
        if c > 2:
            free = [j for j in range(c) if j not in set(y.tolist())]
            if free:
                w[free[0] * k] = 0.0                # a non-target's
    elif p == "duplicate_rows" and n > 1:
        x[1], y[1] = x[0], y[0]
        if c > 1:
            w[k:2 * k] = w[0:k]                     # two identical classes: ties
    if p == "huge_norms":
        x, w = x * _HUGE[dtype], w * _HUGE[dtype]
    elif p == "tiny_norms":
        x, w = x * _TINY[dtype], w * _TINY[dtype]
    if p == "sequence":
        b = 2 if n % 2 == 0 and n >= 4 else 1
        x, y = x.view(b, n // b, d), y.view(b, n // b)
    return x.to(dtype), w.to(dtype), y


__all__ = ["Case", "DEFAULTS", "LINEAR_DEFAULTS", "MARGIN_GRID", "LINEAR_GRID", "PATTERNS",
           "build_inputs", "wrap_angle"]
