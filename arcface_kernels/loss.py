"""The functional API: arcface_loss, its input checks, and the reductions.

Written once above the primitive (``_ops.py``): a backend only supplies its fwd/bwd ops;
the loss per row, label smoothing, ignore_index and the reductions are ordinary torch
ops here, and autograd runs the backend's backward through the fwd op's registration.
:class:`ArcFaceFunction` offers the same loss as a torch.autograd.Function.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import check_bias, check_loss_inputs
from ._config import LossOptions, MarginConfig
from ._ops import autocast_off, local_labels, primitive_backward
from .backends import resolve_backend

class LossStats(NamedTuple):
    """Per-row statistics of a loss call, computed without logits (no gradient).

    lse [N]: log-sum-exp of the margin logits; target_logit [N]: s * psi(c_iy) (0 for
    ignored rows); max_logit [N]: s * max_j cos(x_i, w_j) without margin; prediction [N]
    int64: its class (top-1). All float32 (float64 for float64 inputs).
    """

    lse: Tensor
    target_logit: Tensor
    max_logit: Tensor
    prediction: Tensor

    def accuracy(self, labels: Tensor, ignore_index: int = -100) -> Tensor:
        """Top-1 accuracy over the rows not ignored (0-dim tensor; 0 when none).

        labels: [N] (or [N, 1], as insightface passes them) int64, the labels of the rows
        the stats are of (for PartialFC: the global batch, rank-major). Pass the loss's
        ``ignore_index`` if it is not the default."""
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)
        if tuple(labels.shape) != tuple(self.prediction.shape):
            # a mismatch would broadcast ([N, 1] against [N] gives [N, N]) or fail obscurely
            raise ValueError(f"labels must have shape {tuple(self.prediction.shape)} (the "
                             f"rows of these stats), got {tuple(labels.shape)}")
        valid = labels != ignore_index
        hits = (self.prediction == labels) & valid
        return hits.sum().to(torch.float32) / valid.sum().clamp(min=1).to(torch.float32)


def reduce_rows(loss_rows: Tensor, valid: Tensor, reduction: str,
                count: Optional[Tensor] = None) -> Tensor:
    """Apply the reduction; "mean" divides by the rows not ignored (``count`` if given),
    and is 0 (not NaN) when every row is ignored."""
    loss_rows = torch.where(valid, loss_rows, torch.zeros_like(loss_rows))
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    if count is None:
        count = valid.sum()
    return total / count.clamp(min=1).to(total.dtype)


def floor_probability(rows: Tensor, prob_floor: Optional[float]) -> Tensor:
    """Per-row losses at most -log(prob_floor) in value, with the gradient unchanged:
    insightface clamps each row's softmax probability at 1e-30 before the log (its
    backward ignores the clamp). None: the rows as they are."""
    if prob_floor is None:
        return rows
    cap = -math.log(prob_floor)
    return rows + (rows.clamp(max=cap) - rows).detach()


def check_prob_floor(prob_floor: Optional[float]) -> Optional[float]:
    if prob_floor is None:
        return None
    if isinstance(prob_floor, bool) or not isinstance(prob_floor, (int, float)) \
            or not 0.0 < prob_floor < 1.0:
        raise ValueError(f"prob_floor must be None or a number in (0, 1), got {prob_floor!r}")
    return float(prob_floor)


def combine_loss_rows(lse: Tensor, target: Tensor, sum_z: Tensor, label_smoothing: float,
                      num_classes: int) -> Tensor:
    """loss_i = lse_i - (1 - eps) z_iy - eps / C sum_j z_ij."""
    loss = lse - (1.0 - label_smoothing) * target
    if label_smoothing:
        loss = loss - (label_smoothing / num_classes) * sum_z
    return loss


def arcface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *,
                 s: Optional[float] = None, m1: float = 1.0, m2: Optional[float] = None,
                 m3: float = 0.0, reduction: str = "mean", ignore_index: int = -100,
                 backend: str = "auto", margin_mode: str = "fallback",
                 target_grad: str = "exact", label_smoothing: float = 0.0,
                 normalize: bool = True, sub_centers: int = 1,
                 interclass_filtering_threshold: float = 0.0,
                 chunk_size: Optional[int] = None, grad_filter_eps: Optional[float] = None,
                 return_stats: bool = False) -> Union[Tensor, Tuple[Tensor, LossStats]]:
    """Combined-margin softmax cross-entropy without materializing the N x C logits.

    Args:
        embeddings: [N, D] float16/bfloat16/float32/float64.
        weight: [C * sub_centers, D], same dtype and device (class-major, as insightface).
        labels: [N] integer class ids in [0, C) (any integer dtype), or
            ``ignore_index`` for rows that do not count.
        ignore_index: the label of rows that add nothing to the loss (default -100).
        s, m1, m2, m3: scale and margins; target logit s * (cos(m1 * theta + m2) - m3).
            ArcFace: m2=0.5; CosFace: m2=0, m3=0.35..0.4; SphereFace: m1 > 1. Defaults:
            s=64, m2=0.5, or s=1, m2=0 with normalize=False (plain linear cross-entropy).
        reduction: "mean" (over rows not ignored; 0 if none), "sum" or "none" ([N]).
        backend: "auto", "reference", "chunked", "triton" or "cpp" (see
            :func:`available_backends`).
        margin_mode: "fallback" (default), "easy" or "none": see reference.py.
        target_grad: "exact" (default) or "straight_through" (insightface's current code).
        label_smoothing: eps in [0, 1].
        normalize: cosine logits (default). normalize=False (with the defaults s=1,
            m2=0) is plain linear cross-entropy: cross_entropy(embeddings @ weight.T,
            labels); :func:`linear_cross_entropy` adds the LLM-head options.
        interclass_filtering_threshold: 0 (off), or t > 0: non-target cosines above t
            count as 0 in value and gradient (insightface's option of that name).
        sub_centers: K sub-centers per class (sub-center ArcFace): weight has C*K rows,
            the logit of class j is the max over its K rows.
        chunk_size: classes per chunk (chunked backend) or a tile hint; None = default.
        grad_filter_eps: None (default: the exact gradient), or eps in (0, 1): in the
            backward, softmax values p_ij < eps of non-target classes may count as 0
            (Cut Cross-Entropy's filter; the triton backend skips whole gradient tiles
            below it, chunked drops single values; reference and cpp raise
            NotImplementedError). Each dropped value moves a row's gradient by at most
            s |dL/dloss| eps. Unsafe early in training at large C, where every p is
            about 1/C yet the negatives together carry most of the gradient.
        return_stats: also return :class:`LossStats` (lse, top-1 prediction, ...).

    Returns:
        The loss (float32, or float64 for float64 inputs), and the stats if asked.
    """
    s, m2 = default_scale_margin(s, m2, normalize)
    cfg = MarginConfig(s=s, m1=m1, m2=m2, m3=m3, margin_mode=margin_mode,
                       target_grad=target_grad, normalize=normalize, sub_centers=sub_centers,
                       interclass_filtering_threshold=interclass_filtering_threshold)
    opts = LossOptions(reduction=reduction, ignore_index=ignore_index,
                       label_smoothing=label_smoothing, chunk_size=chunk_size, backend=backend,
                       grad_filter_eps=grad_filter_eps)
    fwd = _forward(embeddings, weight, labels, cfg, opts)
    lse, target, _, max_z, argmax = fwd.stats
    if not return_stats:
        return fwd.loss
    return fwd.loss, LossStats(lse.detach(), target.detach(), max_z.detach(), argmax)


def default_scale_margin(s: Optional[float], m2: Optional[float], normalize: bool
                         ) -> Tuple[float, float]:
    """The defaults of s and m2: 64 and 0.5 (ArcFace) for cosine logits, 1 and 0 (plain
    cross-entropy) with normalize=False."""
    if s is None:
        s = 64.0 if normalize else 1.0
    if m2 is None:
        m2 = 0.5 if normalize else 0.0
    return s, m2


class _Forward(NamedTuple):
    loss: Tensor
    stats: tuple        # the fwd op's (lse, target, sum_z, max_z, argmax)
    local: Tensor       # labels as shard positions (-1: ignored)
    valid: Tensor       # rows not ignored
    backend: object     # the Backend that ran
    scalars: tuple      # the ops' scalar arguments
    num_classes: int


def _forward(embeddings: Tensor, weight: Tensor, labels: Tensor, cfg: MarginConfig,
             opts: LossOptions, bias: Optional[Tensor] = None,
             names: Tuple[str, str, str] = ("embeddings", "weight", "labels"),
             z_loss: float = 0.0) -> _Forward:
    """The single-device loss up to its reduction, shared by arcface_loss (whose
    autograd is the fwd op's registration), ArcFaceFunction and linear_cross_entropy
    (which adds the bias and the z-loss z_loss * lse^2 per row)."""
    k = cfg.sub_centers
    check_loss_inputs(embeddings, weight, labels, k, names=names)
    check_bias(bias, weight, k, weight_name=names[1])
    labels = labels.long()   # any integer dtype (insightface passes int32 at times)
    be = resolve_backend(opts.backend, embeddings.device)
    num_classes = weight.shape[0] // k
    local = local_labels(labels, 0, num_classes, num_classes, opts.ignore_index)
    scalars = (*cfg.op_args(), opts.grad_filter, opts.block)
    with autocast_off(embeddings.device):
        stats = be.fwd(embeddings, weight, local, None, bias, *scalars)
    valid = labels != opts.ignore_index
    rows = combine_loss_rows(stats[0], stats[1], stats[2], opts.label_smoothing,
                             num_classes)
    if z_loss:
        rows = rows + z_loss * stats[0] * stats[0]
    return _Forward(reduce_rows(rows, valid, opts.reduction), tuple(stats), local, valid,
                    be, scalars, num_classes)


def loss_row_coefficients(grad_rows: Tensor, label_smoothing: float, num_classes: int
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """The derivative of :func:`combine_loss_rows`: (dL/dlse, dL/dtarget, dL/dsum_z) for
    row gradients ``grad_rows`` [N] (the primitive backward's g_p, g_t, g_s)."""
    g_t = -(1.0 - label_smoothing) * grad_rows
    g_s = -(label_smoothing / num_classes) * grad_rows if label_smoothing \
        else torch.zeros_like(grad_rows)
    return grad_rows, g_t, g_s


class ArcFaceFunction(torch.autograd.Function):
    """The loss as a ``torch.autograd.Function``, for code that composes or subclasses
    Functions; :func:`arcface_loss` computes the same (it reaches the same ops through
    their ``torch.library`` autograd registration, which torch.compile traces).

    ``ArcFaceFunction.apply(embeddings, weight, labels, margin, options)`` -> the loss.
    ``margin`` is a :class:`MarginConfig`, ``options`` a :class:`LossOptions` (both
    positional: ``Function.apply`` takes no keywords). The forward runs the backend's
    forward op; the backward runs the one backward every entry point shares
    (``_ops.primitive_backward``) on the row coefficients of the loss.
    """

    @staticmethod
    def forward(ctx, embeddings: Tensor, weight: Tensor, labels: Tensor,
                margin: MarginConfig, options: LossOptions) -> Tensor:
        if not isinstance(margin, MarginConfig):
            raise TypeError(f"margin must be a MarginConfig, got {type(margin).__name__}")
        if not isinstance(options, LossOptions):
            raise TypeError(f"options must be a LossOptions, got {type(options).__name__}")
        fwd = _forward(embeddings, weight, labels, margin, options)
        ctx.save_for_backward(embeddings, weight, fwd.local, fwd.stats[0], fwd.valid)
        ctx.bwd, ctx.scalars, ctx.num_classes = fwd.backend.bwd, fwd.scalars, fwd.num_classes
        ctx.options = options
        return fwd.loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], None,
                                                  None, None]:
        x, w, local, lse, valid = ctx.saved_tensors
        opts = ctx.options
        grad_loss = grad_loss.to(lse.dtype)
        if opts.reduction == "none":
            grad_rows = grad_loss
        elif opts.reduction == "sum":
            grad_rows = grad_loss.expand(lse.shape)
        else:
            grad_rows = (grad_loss / valid.sum().clamp(min=1).to(lse.dtype)).expand(lse.shape)
        grad_rows = torch.where(valid, grad_rows, torch.zeros_like(grad_rows))
        g_p, g_t, g_s = loss_row_coefficients(grad_rows, opts.label_smoothing,
                                              ctx.num_classes)
        dx, dw, _ = primitive_backward(ctx.bwd, x, w, local, None, None, lse, ctx.scalars,
                                       g_p, g_t, g_s, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1])
        return dx, dw, None, None, None
