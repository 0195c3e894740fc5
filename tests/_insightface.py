"""A stand-in for insightface's ``CombinedMarginLoss`` and the loss its arcface_torch
computes, written here from the formulas of its code (commit 657ae30 and later; nothing
copied), as the oracle of the insightface compatibility tests.

insightface (arcface_torch, ``losses.py`` / ``partial_fc_v2.py``), per batch:

1. logits = clamp(normalize(x) @ normalize(w).T, -1, 1)
2. with interclass_filtering_threshold t > 0: a constant mask zeroes every non-target
   logit above t (rows without a target: every logit above t);
3. m1 == 1 and m3 == 0: under no_grad, every logit becomes cos(arccos(logit)) and the
   target cos(arccos(logit) + m2) (no wrap at pi); the gradient passes straight through;
   m3 > 0: target logit - m3 (m1, m2 unused); else: an exception;
4. logits *= s; softmax; loss = mean over rows of -log(max(p_target, 1e-30)), whose
   backward is that of the unfloored cross-entropy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CONFIGS = {
    # name: (s, m1, m2, m3, interclass_filtering_threshold)
    "arcface": (64.0, 1.0, 0.5, 0.0, 0.0),
    "cosface": (64.0, 1.0, 0.0, 0.4, 0.0),
    "combined_m3_ignores_m2": (64.0, 1.0, 0.3, 0.2, 0.0),
    "m1_with_m3": (32.0, 0.9, 0.1, 0.35, 0.0),
    "arcface_interclass": (64.0, 1.0, 0.5, 0.0, 0.4),
    "cosface_interclass": (48.0, 1.0, 0.0, 0.35, 0.3),
    "plain_softmax": (30.0, 1.0, 0.0, 0.0, 0.0),
}
REJECTED = {"sphereface": (64.0, 1.35, 0.0, 0.0, 0.0), "negative_m3": (64.0, 1.0, 0.5, -0.1, 0.0)}


class CombinedMarginLossStandIn:
    """What PartialFC.from_insightface reads of a CombinedMarginLoss: its attributes."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0.0):
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The margin logits from clamped cosine logits [N, C]; labels [N], -1 = none."""
        pos = torch.nonzero(labels != -1).flatten()
        cols = labels[pos]
        t = self.interclass_filtering_threshold
        if t > 0:
            keep = (logits <= t).to(logits.dtype).detach()
            keep[pos, cols] = 1.0     # the target itself is never filtered
            logits = logits * keep
        if self.m1 == 1.0 and self.m3 == 0.0:
            with torch.no_grad():
                ang = torch.arccos(logits)
                ang[pos, cols] = ang[pos, cols] + self.m2
                target = torch.cos(ang)
            logits = logits + (target - logits).detach()   # value cos(...), gradient 1
        elif self.m3 > 0:
            shift = torch.zeros_like(logits)
            shift[pos, cols] = self.m3
            logits = logits - shift
        else:
            raise ValueError("unsupported margin")
        return logits * self.s


def insightface_loss(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                     margin: CombinedMarginLossStandIn) -> torch.Tensor:
    """The loss insightface computes (mean over the rows), differentiable in x and w."""
    logits = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).clamp(-1, 1)
    z = margin(logits, labels)
    rows = torch.logsumexp(z, dim=1) - z.gather(1, labels.unsqueeze(1)).squeeze(1)
    cap = -math.log(1e-30)
    rows = rows + (rows.clamp(max=cap) - rows).detach()   # p floored at 1e-30, in value
    return rows.mean()


def make_problem(n: int, c: int, d: int, seed: int = 0):
    """(x [n, d], w [c, d], labels [n]) in float64; some rows lean away from their target
    (theta + m2 past pi, where the wrap rules differ) and one row's target is far enough
    below the rest for the 1e-30 floor to apply at s = 64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    lean = torch.linspace(-3.0, 3.0, n, dtype=torch.float64).unsqueeze(1)
    x = x + lean * F.normalize(w[y], dim=1) * x.norm(dim=1, keepdim=True)
    # the last row: exactly opposite its target, the others' cosines near 0
    x[-1] = -w[y[-1]]
    return x, w, y
