"""What insightface's arcface_torch computes, as this library's settings.

insightface's current ``CombinedMarginLoss`` (since its commit 657ae30, December 2022,
"fixed arcface impl"), followed by its softmax cross-entropy, computes per row, from the
clamped cosines c of the embedding with each class centre:

* with ``interclass_filtering_threshold`` t > 0: non-target cosines above t are
  multiplied by 0, a constant mask (value and gradient 0);
* if ``m1 == 1`` and ``m3 == 0``: the target logit s cos(theta + m2), with theta + m2
  not wrapped at pi, computed under ``torch.no_grad()``: the gradient passes straight
  through to the cosine (our ``margin_mode="none"``, ``target_grad="straight_through"``);
* elif ``m3 > 0``: the target logit s (c - m3), an ordinary CosFace margin; m1 and m2 are
  ignored without a word;
* else it raises (m1 != 1 is not supported there);
* the loss of a row is -log(max(p, 1e-30)), the probability floored in value only (the
  backward is that of the unfloored loss), averaged over the batch.

``easy_margin`` is never read there. insightface before December 2022 used the ArcFace
paper's wrap rule with the exact gradient: this library's defaults
(``margin_mode="fallback"``, ``target_grad="exact"``).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict

INSIGHTFACE_PROB_FLOOR = 1e-30
_warned = set()


def _number(obj, name: str, default=None) -> float:
    v = getattr(obj, name, default)
    if v is None:
        raise TypeError(f"margin_loss must have insightface CombinedMarginLoss's attribute "
                        f"{name!r} (s, m1, m2, m3), got {type(obj).__name__} without it")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"margin_loss.{name} must be a number, got {v!r}")
    return float(v)


def settings(margin_loss: Any) -> Dict[str, Any]:
    """The constructor keywords of :class:`~arcface_kernels.ArcFaceLoss` /
    :class:`~arcface_kernels.PartialFC` that reproduce insightface's ``margin_loss``
    (an object with attributes s, m1, m2, m3 and, optionally,
    interclass_filtering_threshold). Raises ValueError where insightface raises; warns
    once where insightface ignores m1 / m2 (m3 > 0)."""
    s = _number(margin_loss, "s")
    m1, m2, m3 = (_number(margin_loss, n) for n in ("m1", "m2", "m3"))
    t = _number(margin_loss, "interclass_filtering_threshold", 0.0)
    common = dict(s=s, prob_floor=INSIGHTFACE_PROB_FLOOR,
                  interclass_filtering_threshold=max(t, 0.0))   # t <= 0: off there too
    if m1 == 1.0 and m3 == 0.0:
        return dict(common, m1=1.0, m2=m2, m3=0.0, margin_mode="none",
                    target_grad="straight_through")
    if m3 > 0:
        if (m1 != 1.0 or m2 != 0.0) and (m1, m2, m3) not in _warned:
            _warned.add((m1, m2, m3))
            warnings.warn(f"insightface's CombinedMarginLoss ignores m1 and m2 when m3 > 0 "
                          f"(it computes CosFace, s * (cos - m3)); so does this head: "
                          f"m1={m1} and m2={m2} are dropped, m3={m3} is kept",
                          stacklevel=3)
        return dict(common, m1=1.0, m2=0.0, m3=m3, margin_mode="none",
                    target_grad="exact")
    raise ValueError(f"insightface's CombinedMarginLoss supports m1 == 1 with m3 == 0 "
                     f"(ArcFace) or m3 > 0 (CosFace); it raises for m1={m1}, m2={m2}, "
                     f"m3={m3}. For SphereFace-style margins build the head directly: "
                     f"ArcFaceLoss(embedding_size, num_classes, s, m1, m2, m3)")
