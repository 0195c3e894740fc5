"""nn.Module front-ends."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._config import LossOptions, MarginConfig, check_positive_int
from .loss import LossStats, arcface_loss


class ArcFaceLoss(nn.Module):
    """Margin-softmax head owning the class centres ``weight`` [C * sub_centers, D].

    forward(embeddings [N, D], labels [N]) -> loss. Same knobs as
    :func:`arcface_kernels.arcface_loss` (grad_filter_eps included); the weight is initialised N(0, 0.01) as in
    insightface. ``last_stats`` holds the :class:`LossStats` (lse, top-1 prediction) of
    the last forward, for accuracy logging at no extra cost
    (``head.last_stats.accuracy(labels, head.ignore_index)``). Embeddings of another
    float dtype than the weight (autocast, a float32 master weight) are met with a copy of
    the weight in the embeddings' dtype; the loss is float32 (float64 for float64).
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0,
                 m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, *,
                 margin_mode: str = "fallback", target_grad: str = "exact",
                 label_smoothing: float = 0.0, normalize: bool = True, sub_centers: int = 1,
                 reduction: str = "mean", ignore_index: int = -100,
                 chunk_size: Optional[int] = None, backend: str = "auto",
                 grad_filter_eps: Optional[float] = None,
                 device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        check_positive_int("embedding_size", embedding_size)
        check_positive_int("num_classes", num_classes)
        self.cfg = MarginConfig(s=s, m1=m1, m2=m2, m3=m3, margin_mode=margin_mode,
                                target_grad=target_grad, normalize=normalize,
                                sub_centers=sub_centers)
        LossOptions(reduction=reduction, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, chunk_size=chunk_size, backend=backend,
                    grad_filter_eps=grad_filter_eps)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.label_smoothing, self.reduction, self.ignore_index = (
            label_smoothing, reduction, ignore_index)
        self.chunk_size, self.backend = chunk_size, backend
        self.grad_filter_eps = grad_filter_eps
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, embedding_size,
                                               device=device, dtype=dtype))
        self.last_stats: Optional[LossStats] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        c = self.cfg
        weight = self.weight
        if isinstance(embeddings, Tensor) and weight.dtype != embeddings.dtype:
            # autocast / half embeddings, fp32 master weight (arcface_loss checks the rest)
            weight = weight.to(embeddings.dtype)
        loss, stats = arcface_loss(
            embeddings, weight, labels, s=c.s, m1=c.m1, m2=c.m2, m3=c.m3,
            reduction=self.reduction, ignore_index=self.ignore_index, backend=self.backend,
            margin_mode=c.margin_mode, target_grad=c.target_grad,
            label_smoothing=self.label_smoothing, normalize=c.normalize,
            sub_centers=c.sub_centers, chunk_size=self.chunk_size,
            grad_filter_eps=self.grad_filter_eps, return_stats=True)
        self.last_stats = stats
        return loss

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"s={c.s}, m1={c.m1}, m2={c.m2}, m3={c.m3}, margin_mode={c.margin_mode!r}, "
                f"sub_centers={c.sub_centers}, backend={self.backend!r}")
