"""Peers' margin losses behind the interface of ``arcface-kernels check``.

    arcface-kernels check examples.check_peers:pml_arcface
    arcface-kernels check examples.check_peers:insightface_combined_margin

Each function is ``fn(embeddings, weight, labels, **settings) -> loss`` with weight
[C, D] (a row per class centre) and a ``supports`` attribute naming the settings it
implements (see :mod:`arcface_kernels.testing`). docs/testing.md shows what the checks
found.

* :func:`pml_arcface` runs pytorch-metric-learning's own ``losses.ArcFaceLoss`` (its
  margin is in degrees and its W is [D, C]: converted here; its gradient for W is read
  off its parameter).
* :func:`insightface_combined_margin` is a plain-PyTorch transcription, written here
  from its formulas, of insightface's current (since December 2022) arcface_torch
  ``CombinedMarginLoss`` followed by the cross-entropy of its Partial FC: cosines
  clamped to [-1, 1]; with m3 > 0 the target is c - m3 (m2 is not applied); with
  m1 = 1 and m3 = 0 it is cos(acos(c) + m2) computed without gradient (the gradient
  passes straight through); every row's probability is floored at 1e-30 in the loss
  value (its hand-written backward is the plain softmax cross-entropy's).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class _PMLBridge(torch.autograd.Function):
    """PML's loss of (x, w): its gradient for W comes from its parameter, so the
    forward computes both gradients at once and the backward scales them."""

    @staticmethod
    def forward(ctx, x, w, labels, s, m2):
        from pytorch_metric_learning.losses import ArcFaceLoss
        loss_fn = ArcFaceLoss(num_classes=w.shape[0], embedding_size=w.shape[1],
                              margin=math.degrees(m2), scale=s)
        loss_fn.W.data = w.detach().t().clone()
        with torch.enable_grad():
            xe = x.detach().clone().requires_grad_(True)
            loss = loss_fn(xe, labels)
            dx, dW = torch.autograd.grad(loss, (xe, loss_fn.W))
        ctx.save_for_backward(dx, dW.t())
        return loss.detach()

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        return g * dx, g * dw, None, None, None


def pml_arcface(embeddings: Tensor, weight: Tensor, labels: Tensor, s: float = 64.0,
                m2: float = 0.5) -> Tensor:
    """pytorch_metric_learning.losses.ArcFaceLoss(margin=degrees(m2), scale=s)."""
    return _PMLBridge.apply(embeddings, weight, labels, s, m2)


pml_arcface.supports = {"s": True, "m2": True}


def insightface_combined_margin(embeddings: Tensor, weight: Tensor, labels: Tensor,
                                s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                                m3: float = 0.0) -> Tensor:
    """insightface's current CombinedMarginLoss + Partial FC cross-entropy (see module)."""
    if m1 != 1.0:
        raise NotImplementedError("insightface's current code rejects m1 != 1")
    logits = (F.normalize(embeddings) @ F.normalize(weight).T).clamp(-1.0, 1.0)
    rows = torch.arange(labels.shape[0], device=labels.device)
    target = logits[rows, labels]
    if m3 > 0:
        final = target - m3
    else:
        with torch.no_grad():
            shifted = torch.cos(torch.acos(target) + m2)
        # insightface turns the logits into cos(acos(c) + m2) in place under no_grad:
        # the value changes, the gradient stays that of c
        final = target + (shifted - target).detach()
    logits = logits.index_put((rows, labels), final) * s
    # its cross-entropy floors each row's probability at 1e-30 in the forward, while its
    # hand-written backward is that of the plain softmax cross-entropy
    nll = -torch.log_softmax(logits, dim=1)[rows, labels]
    floored = torch.clamp(nll, max=-math.log(1e-30))
    return (nll + (floored - nll).detach()).mean()


insightface_combined_margin.supports = {
    "s": True, "m2": True, "m3": True, "margin_mode": {"none"},
    "target_grad": {"straight_through"}}
# the semantics it has (the cases that leave these unset run with them)
insightface_combined_margin.defaults = {"margin_mode": "none",
                                        "target_grad": "straight_through"}
