"""nn.Module front-ends."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._config import LossOptions, MarginConfig, check_positive_int
from .loss import LossStats, arcface_loss, check_prob_floor, default_scale_margin, \
    floor_probability, reduce_rows


class MarginAttributes:
    """The scale and margins of a head as settable attributes (``head.m2 = 0.3``): each
    set is validated at once (a ValueError / TypeError names the value) and takes effect
    at the next forward. They live in ``self.cfg``, a frozen :class:`MarginConfig` that a
    set replaces; a schedule may also assign a whole new ``cfg``."""

    cfg: MarginConfig

    def _replace_cfg(self, **changes) -> None:
        self.cfg = dataclasses.replace(self.cfg, **changes)

    s = property(lambda self: self.cfg.s, lambda self, v: self._replace_cfg(s=v),
                 doc="the logit scale s (> 0)")
    m1 = property(lambda self: self.cfg.m1, lambda self, v: self._replace_cfg(m1=v),
                  doc="the multiplicative angular margin m1 (> 0)")
    m2 = property(lambda self: self.cfg.m2, lambda self, v: self._replace_cfg(m2=v),
                  doc="the additive angular margin m2 in [0, pi)")
    m3 = property(lambda self: self.cfg.m3, lambda self, v: self._replace_cfg(m3=v),
                  doc="the additive cosine margin m3")
    interclass_filtering_threshold = property(
        lambda self: self.cfg.interclass_filtering_threshold,
        lambda self, v: self._replace_cfg(interclass_filtering_threshold=v),
        doc="non-target cosines above it count as 0 (0 = off)")


class ArcFaceLoss(MarginAttributes, nn.Module):
    """Margin-softmax head owning the class centres ``weight`` [C * sub_centers, D].

    forward(embeddings [N, D], labels [N]) -> loss. Same knobs as
    :func:`arcface_kernels.arcface_loss` (grad_filter_eps included); the weight is
    initialised N(0, 0.01) as in insightface. ``s``, ``m1``, ``m2``, ``m3`` and
    ``interclass_filtering_threshold`` are settable attributes (:class:`MarginAttributes`),
    for margin schedules. ``prob_floor`` (None by default): each row's loss is at most
    -log(prob_floor) in value, its gradient unchanged, as insightface's 1e-30 floor.
    ``last_stats`` holds the :class:`LossStats` (lse, top-1 prediction) of
    the last forward, for accuracy logging at no extra cost
    (``head.last_stats.accuracy(labels, head.ignore_index)``). Embeddings of another
    float dtype than the weight (autocast, a float32 master weight) are met with a copy of
    the weight in the embeddings' dtype; the loss is float32 (float64 for float64).
    :meth:`from_insightface` builds the head from an insightface ``CombinedMarginLoss``.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: Optional[float] = None,
                 m1: float = 1.0, m2: Optional[float] = None, m3: float = 0.0, *,
                 margin_mode: str = "fallback", target_grad: str = "exact",
                 label_smoothing: float = 0.0, normalize: bool = True, sub_centers: int = 1,
                 interclass_filtering_threshold: float = 0.0,
                 prob_floor: Optional[float] = None,
                 reduction: str = "mean", ignore_index: int = -100,
                 chunk_size: Optional[int] = None, backend: str = "auto",
                 grad_filter_eps: Optional[float] = None,
                 device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        check_positive_int("embedding_size", embedding_size)
        check_positive_int("num_classes", num_classes)
        s, m2 = default_scale_margin(s, m2, normalize)
        self.cfg = MarginConfig(s=s, m1=m1, m2=m2, m3=m3, margin_mode=margin_mode,
                                target_grad=target_grad, normalize=normalize,
                                sub_centers=sub_centers,
                                interclass_filtering_threshold=interclass_filtering_threshold)
        LossOptions(reduction=reduction, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, chunk_size=chunk_size, backend=backend,
                    grad_filter_eps=grad_filter_eps)
        self.prob_floor = check_prob_floor(prob_floor)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.label_smoothing, self.reduction, self.ignore_index = (
            label_smoothing, reduction, ignore_index)
        self.chunk_size, self.backend = chunk_size, backend
        self.grad_filter_eps = grad_filter_eps
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, embedding_size,
                                               device=device, dtype=dtype))
        self.last_stats: Optional[LossStats] = None
        self.reset_parameters()

    @classmethod
    def from_insightface(cls, margin_loss, embedding_size: int, num_classes: int,
                         **kwargs) -> "ArcFaceLoss":
        """The head that computes what insightface's current ``CombinedMarginLoss`` with a
        softmax cross-entropy computes on one device (loss, embedding and weight
        gradients), from any object with its attributes ``s``, ``m1``, ``m2``, ``m3`` and
        ``interclass_filtering_threshold`` (insightface need not be installed). See
        :func:`arcface_kernels.compat.insightface.settings`; ``kwargs`` go to the
        constructor (device, dtype, backend, ...)."""
        from .compat.insightface import settings
        return cls(embedding_size, num_classes, **{**settings(margin_loss), **kwargs})

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        c = self.cfg
        weight = self.weight
        if isinstance(embeddings, Tensor) and embeddings.dim() == 2 \
                and embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape [N, {self.embedding_size}] (embedding_size="
                f"{self.embedding_size}), got {tuple(embeddings.shape)}. ArcFaceLoss takes "
                f"(embedding_size, num_classes); for pytorch-metric-learning's order "
                f"(num_classes, embedding_size) use arcface_kernels.compat.pml.ArcFaceLoss")
        if isinstance(embeddings, Tensor) and weight.dtype != embeddings.dtype:
            # autocast / half embeddings, fp32 master weight (arcface_loss checks the rest)
            weight = weight.to(embeddings.dtype)
        floor = self.prob_floor is not None
        loss, stats = arcface_loss(
            embeddings, weight, labels, s=c.s, m1=c.m1, m2=c.m2, m3=c.m3,
            reduction="none" if floor else self.reduction, ignore_index=self.ignore_index,
            backend=self.backend, margin_mode=c.margin_mode, target_grad=c.target_grad,
            label_smoothing=self.label_smoothing, normalize=c.normalize,
            sub_centers=c.sub_centers,
            interclass_filtering_threshold=c.interclass_filtering_threshold,
            chunk_size=self.chunk_size, grad_filter_eps=self.grad_filter_eps,
            return_stats=True)
        if floor:
            valid = labels.reshape(-1) != self.ignore_index
            loss = reduce_rows(floor_probability(loss, self.prob_floor), valid,
                               self.reduction)
        self.last_stats = stats
        return loss

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"s={c.s}, m1={c.m1}, m2={c.m2}, m3={c.m3}, margin_mode={c.margin_mode!r}, "
                f"sub_centers={c.sub_centers}, backend={self.backend!r}")
