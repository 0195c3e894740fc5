"""Fused linear cross-entropy for large vocabularies (LLM heads): the loss of
``F.cross_entropy(e @ c.T + bias, targets)`` with the options of Cut Cross-Entropy's and
Liger-Kernel's fused linear cross-entropy, computed by the same primitive as the margin
losses (``normalize=False``, s = 1, no margin), so nothing of size N x V is held.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

from torch import Tensor

from ._config import LossOptions, MarginConfig
from .loss import _forward


def _check_shapes(e, targets, shift) -> int:
    """The checks before flattening; returns shift as an int."""
    for name, t in (("e", e), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(shift, bool):
        shift = int(shift)
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be a bool or an int >= 0, got {shift!r}")
    if e.dim() < 1:
        raise ValueError("e must be [..., D], got a 0-d tensor")
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(e.shape[:-1])} (e's shape "
                         f"without its last dim D), got {tuple(targets.shape)}")
    if shift:
        if e.dim() < 2:
            raise ValueError(f"shift={shift} needs a sequence dimension: e must be "
                             f"[..., T, D] and targets [..., T], got e of shape "
                             f"{tuple(e.shape)}")
        if shift >= e.shape[-2]:
            raise ValueError(f"shift={shift} must be less than the sequence length "
                             f"T={e.shape[-2]} (e of shape {tuple(e.shape)})")
    return shift


def linear_cross_entropy(e: Tensor, c: Tensor, targets: Tensor, *,
                         bias: Optional[Tensor] = None, ignore_index: int = -100,
                         softcap: Optional[float] = None, reduction: str = "mean",
                         shift: Union[bool, int] = 0, z_loss: float = 0.0,
                         label_smoothing: float = 0.0, return_lse: bool = False,
                         backend: str = "auto", chunk_size: Optional[int] = None,
                         grad_filter_eps: Optional[float] = None
                         ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Cross-entropy of the logits z = softcap(e @ c.T + bias) without forming them.

    Args:
        e: [..., D] embeddings (hidden states), float16/bfloat16/float32/float64.
        c: [V, D] classifier (the LM head's weight), e's dtype.
        targets: [...] (e's shape without D) integer class ids in [0, V), or
            ``ignore_index`` for positions that do not count.
        bias: None or [V] in c's dtype, added to the logits.
        softcap: None, or a cap > 0: z -> softcap * tanh(z / softcap) (Gemma 2).
        reduction: "mean" (over the positions not ignored; 0 if none), "sum" or "none"
            (shape of targets, after the shift; 0 at ignored positions).
        shift: 0 / False, or k >= 1 (True = 1): position t of e predicts target t + k;
            the last k positions of e and the first k of targets are dropped, as Cut
            Cross-Entropy's ``shift`` does for next-token prediction.
        z_loss: adds z_loss * lse^2 per position (PaLM's auxiliary loss).
        label_smoothing: eps in [0, 1], as F.cross_entropy's.
        return_lse: also return the log-sum-exp of each position's logits (shape of the
            loss with reduction="none"), differentiable.
        backend, chunk_size, grad_filter_eps: as :func:`arcface_kernels.arcface_loss`.

    Returns:
        The loss (float32, or float64 for float64 inputs), and lse if asked.
    """
    shift = _check_shapes(e, targets, shift)
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) \
            or not 0.0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if shift:
        t = e.shape[-2]
        e = e[..., :t - shift, :]
        targets = targets[..., shift:]
    shape = tuple(targets.shape)
    cfg = MarginConfig(s=1.0, m1=1.0, m2=0.0, m3=0.0, normalize=False, softcap=softcap)
    opts = LossOptions(reduction=reduction, ignore_index=ignore_index,
                       label_smoothing=label_smoothing, chunk_size=chunk_size,
                       backend=backend, grad_filter_eps=grad_filter_eps)
    x = e.reshape(-1, e.shape[-1])
    fwd = _forward(x, c, targets.reshape(-1), cfg, opts, bias=bias,
                   names=("e", "c", "targets"), z_loss=float(z_loss))
    loss = fwd.loss.view(shape) if reduction == "none" else fwd.loss
    if return_lse:
        return loss, fwd.stats[0].view(shape)
    return loss
