"""Drop-ins for pytorch-metric-learning's classification losses: ``ArcFaceLoss``,
``CosFaceLoss`` and ``SubCenterArcFaceLoss`` with its constructors (argument order
``num_classes, embedding_size``, the margin in degrees for the angular ones), its weight
``W`` [D, C] (state_dict key ``"W"``), its ``forward(embeddings, labels, indices_tuple,
ref_emb, ref_labels)`` with miner tuples, ``get_logits`` and ``get_outliers``; the loss is
computed by this library's fused kernels (no N x C logits).

What pytorch-metric-learning (PML, 2.x) computes, and these classes reproduce:

* ``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)``: target logit
  s cos(theta + m) with m = radians(margin) while theta <= pi - m, else
  s (cos(theta) - m sin(m)): the ArcFace paper's rule, ``margin_mode="fallback"``, with
  the exact gradient through the arc-cosine.
* ``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)``: s (cos - m).
* ``SubCenterArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64,
  sub_centers=3)``: the ArcFace margin on the best of each class's K sub-centers;
  W [D, C K] with class j's centres in columns j K .. j K + K - 1.
* A miner's ``indices_tuple`` (pairs (a1, p, a2, n) or triplets (a, p, n)) weights row i
  by (times i appears in the tuple) / (most times any row appears): rows it never names
  weigh 0. The loss is the mean over all N rows of weight x cross-entropy (PML's default
  MeanReducer).

PML's other options (a reducer, a distance, weight / embedding regularizers, a weight
init function) are not provided: passing one raises NotImplementedError. W is
initialised N(0, 1), as PML's default ``torch.nn.init.normal_``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._config import MarginConfig, check_positive_int
from ..loss import arcface_loss

__all__ = ["ArcFaceLoss", "CosFaceLoss", "SubCenterArcFaceLoss", "miner_weights"]

_UNSUPPORTED = ("reducer", "distance", "weight_regularizer", "weight_reg_weight",
                "embedding_regularizer", "embedding_reg_weight", "weight_init_func",
                "collect_stats")


def miner_weights(indices_tuple: Optional[Sequence[Tensor]], n: int, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """PML's per-row weights of a miner's output: 1 everywhere without one (or with an
    empty one); else count_i / max count, count_i the times row i appears in the tuple."""
    if indices_tuple is None or all(len(t) == 0 for t in indices_tuple):
        return torch.ones(n, dtype=dtype, device=device)
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(f"indices_tuple must be a miner's tuple of 3 (triplets) or 4 "
                         f"(pairs) index tensors, got {type(indices_tuple).__name__} of "
                         f"length {len(indices_tuple) if hasattr(indices_tuple, '__len__') else '?'}")
    idx = torch.cat([torch.as_tensor(t, device=device).reshape(-1).long()
                     for t in indices_tuple])
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"indices_tuple holds row indices in [{int(idx.min())}, "
                         f"{int(idx.max())}], outside the batch's [0, {n})")
    counts = torch.bincount(idx, minlength=n).to(dtype)
    return counts / counts.max()


class _PMLMarginLoss(nn.Module):
    """The shared part: W [D, C * K], PML's forward and get_logits."""

    _sub_centers = 1

    def __init__(self, num_classes: int, embedding_size: int, margin: float, scale: float,
                 cfg_kwargs: dict, backend: str, chunk_size: Optional[int],
                 unsupported: dict) -> None:
        super().__init__()
        bad = sorted(k for k in unsupported if k in _UNSUPPORTED)
        if bad:
            raise NotImplementedError(
                f"{type(self).__name__}: pytorch-metric-learning's option(s) {bad} are not "
                f"provided by arcface_kernels.compat.pml (the default mean reduction, "
                f"cosine similarity and no regularizer are)")
        if unsupported:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) "
                            f"{sorted(unsupported)}")
        for name, v in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if isinstance(v, Tensor) or (not isinstance(v, int) and hasattr(v, "shape")):
                raise TypeError(f"{name} must be a positive int, got a tensor")
        check_positive_int("num_classes", num_classes)
        check_positive_int("embedding_size", embedding_size)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin, self.scale = float(margin), float(scale)
        self._cfg = MarginConfig(s=self.scale, sub_centers=self._sub_centers, **cfg_kwargs)
        self.backend, self.chunk_size = backend, chunk_size
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes * self._sub_centers))
        nn.init.normal_(self.W)

    def forward(self, embeddings: Tensor, labels: Tensor,
                indices_tuple: Optional[Sequence[Tensor]] = None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None
                ) -> Tensor:
        """The mean over the N rows of (miner weight x cross-entropy of the margin
        logits). ``ref_emb`` / ``ref_labels`` are not supported (as in PML: ValueError)."""
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb is not supported for this loss function (as in "
                             "pytorch-metric-learning's classification losses)")
        if labels is None:
            raise ValueError("labels are required for this loss function")
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
            raise ValueError(f"embeddings must be a 2-D tensor [N, {self.embedding_size}]")
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have D={embeddings.shape[1]} but this loss was built with "
                f"embedding_size={self.embedding_size} (num_classes={self.num_classes}): "
                f"were the arguments swapped? pytorch-metric-learning's order is "
                f"{type(self).__name__}(num_classes, embedding_size)")
        if isinstance(labels, Tensor):
            labels = labels.to(embeddings.device)
        c = self._cfg
        w = self.W.t()
        if w.dtype != embeddings.dtype:
            w = w.to(embeddings.dtype)
        rows = arcface_loss(embeddings, w, labels, s=c.s, m1=c.m1, m2=c.m2, m3=c.m3,
                            margin_mode=c.margin_mode, sub_centers=c.sub_centers,
                            reduction="none", backend=self.backend,
                            chunk_size=self.chunk_size)
        weights = miner_weights(indices_tuple, embeddings.shape[0], rows.dtype,
                                embeddings.device)
        return (rows * weights).mean()

    def get_cosine(self, embeddings: Tensor, chunk_size: int = 4096) -> Tensor:
        """cos(x_i, class j) [N, C] (the best sub-center), computed a chunk of classes at
        a time: the [D, C K] weight is never normalized in one piece."""
        x = nn.functional.normalize(embeddings, dim=1)
        k = self._sub_centers
        out = []
        for j0 in range(0, self.num_classes, chunk_size):
            j1 = min(self.num_classes, j0 + chunk_size)
            wc = nn.functional.normalize(self.W[:, j0 * k:j1 * k].to(x.dtype), dim=0)
            c = x @ wc
            if k > 1:
                c = c.view(c.shape[0], -1, k).amax(dim=2)
            out.append(c)
        return torch.cat(out, dim=1) if out else x.new_zeros(x.shape[0], 0)

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """scale * cosine [N, C], without margin (PML's get_logits, for evaluation)."""
        return self.get_cosine(embeddings) * self.scale

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"margin={self.margin}, scale={self.scale}")


class ArcFaceLoss(_PMLMarginLoss):
    """pytorch-metric-learning's ``ArcFaceLoss(num_classes, embedding_size, margin=28.6,
    scale=64)``: margin in degrees (module docstring)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6,
                 scale: float = 64, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, **kwargs) -> None:
        m = math.radians(margin)
        super().__init__(num_classes, embedding_size, margin, scale,
                         dict(m2=m, margin_mode="fallback"), backend, chunk_size, kwargs)


class CosFaceLoss(_PMLMarginLoss):
    """pytorch-metric-learning's ``CosFaceLoss(num_classes, embedding_size, margin=0.35,
    scale=64)``: target logit scale * (cos - margin)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35,
                 scale: float = 64, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, **kwargs) -> None:
        super().__init__(num_classes, embedding_size, margin, scale,
                         dict(m2=0.0, m3=float(margin)), backend, chunk_size, kwargs)


class SubCenterArcFaceLoss(_PMLMarginLoss):
    """pytorch-metric-learning's ``SubCenterArcFaceLoss(num_classes, embedding_size,
    margin=28.6, scale=64, sub_centers=3)``: W [D, num_classes * sub_centers]."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6,
                 scale: float = 64, sub_centers: int = 3, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, **kwargs) -> None:
        self._sub_centers = check_positive_int("sub_centers", sub_centers)
        m = math.radians(margin)
        super().__init__(num_classes, embedding_size, margin, scale,
                         dict(m2=m, margin_mode="fallback"), backend, chunk_size, kwargs)
        self.sub_centers = sub_centers

    def get_outliers(self, embeddings: Tensor, labels: Tensor, threshold: float = 75,
                     return_dominant_centers: bool = True) -> Tuple[Tensor, Tensor]:
        """PML's outlier rule: for each class in ``labels``, its dominant sub-center is
        the one most of its samples are closest to; samples whose cosine with it is
        below cos(threshold degrees) are outliers. Returns (outlier row indices,
        dominant centres [D, num_classes]) - a pair whatever
        ``return_dominant_centers`` says, as PML's code returns it; classes absent from
        ``labels`` get a zero column (PML leaves them uninitialized)."""
        if tuple(labels.shape) != (embeddings.shape[0],):
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        k, dev = self._sub_centers, embeddings.device
        cos_t = math.cos(math.radians(threshold))
        with torch.no_grad():
            w = self.W.to(device=dev, dtype=embeddings.dtype)
            dominant = torch.zeros(w.shape[0], self.num_classes, dtype=w.dtype, device=dev)
            x = nn.functional.normalize(embeddings, dim=1)
            outliers = []
            for label in torch.unique(labels).tolist():
                rows = (labels == label).nonzero().flatten()
                centres = w[:, label * k:(label + 1) * k]
                cos = x[rows] @ nn.functional.normalize(centres, dim=0)
                counts = torch.bincount(cos.argmax(dim=1), minlength=k)
                best = int(counts.argmax())
                dominant[:, label] = centres[:, best]
                outliers.append(rows[cos[:, best] < cos_t])
            out = torch.cat(outliers) if outliers else torch.zeros(0, dtype=torch.long,
                                                                   device=dev)
        return out, dominant
