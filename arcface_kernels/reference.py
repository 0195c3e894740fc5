"""Naive PyTorch reference: the oracle every backend is checked against.

The math every backend computes (x [N, D], w [C, D], labels y):

    a_i = 1 / max(|x_i|, eps)      b_j = 1 / max(|w_j|, eps)      (eps = 1e-12)
    c_ij = clamp(a_i b_j <x_i, w_j>, -1, 1)
    z_ij = s c_ij (j != y_i)       z_iy = s psi(c_iy),  psi(c) = cos(m1 acos(c) + m2) - m3
    loss_i = logsumexp_j z_ij - z_iy   (smoothing eps_ls: lse - (1 - eps_ls) z_iy
                                        - eps_ls / C sum_j z_ij)

with the wrap modes where m1 theta + m2 passes pi (fallback: psi = c - m2 sin m2 - m3
past it; easy: psi = c - m3 where c <= 0; none: as written). Its gradient, with
G_ij = dL/dc_ij, r_i = sum_j G_ij c_ij and q_j = sum_i G_ij c_ij:

    dL/dx_i = a_i (sum_j G_ij b_j w_j - r_i a_i x_i)
    dL/dw_j = b_j (sum_i G_ij a_i x_i - q_j b_j w_j)

Sub-centers: w has C K rows and c_ij is the max over class j's K rows (the gradient goes
to the arg-max row). The forward / backward primitive the backends implement is in
``_ops.py``.

It materializes the N x C logits and lets autograd do the rest, so it is as plain as
that math allows. Two things autograd would get "wrong"
with respect to that math are spelled out explicitly:

* the clamp of the cosine to [-1, 1] passes the gradient straight through (the design's
  gradient formula has no clamp term), and
* the target margin psi(c) has the design's derivative psi'(c): finite at c = +-1
  (sin(theta) is floored at ``SIN2_MIN``), 1 in the fallback / easy branches, and 1
  everywhere in straight-through mode.

This module is also the single home of the margin formulas in Python: the chunked
backend imports :func:`margin_psi` and :func:`margin_dpsi` from here.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._config import GRAD_MODES, WRAP_MODES, MarginConfig, check_grad_filter, \
    check_reduction
from ._ops import acc_dtype, define_python_backend

NORM_EPS = 1e-12   # as F.normalize
SIN2_MIN = 1e-12   # floor of sin(theta)^2 in psi'(c), so that psi' is finite at c = +-1

_FALLBACK = WRAP_MODES["fallback"]
_EASY = WRAP_MODES["easy"]
_STRAIGHT = GRAD_MODES["straight_through"]


def fallback_threshold(m1: float, m2: float) -> float:
    """cos of the angle past which m1*theta + m2 exceeds pi (fallback mode)."""
    return math.cos(min((math.pi - m2) / m1, math.pi))


def _wrapped_branch(c: Tensor, m1: float, m2: float, wrap_mode: int) -> Optional[Tensor]:
    """Boolean mask of the target cosines that take the fallback / easy branch."""
    if wrap_mode == _FALLBACK:
        return c < fallback_threshold(m1, m2)
    if wrap_mode == _EASY:
        return c <= 0
    return None


def margin_psi(c: Tensor, m1: float, m2: float, m3: float, wrap_mode: int) -> Tensor:
    """Target logit before scaling: psi(c) = cos(m1*acos(c) + m2) - m3, with wrap modes."""
    if m1 == 1.0:
        sin_t = torch.sqrt(torch.clamp(1.0 - c * c, min=0.0))
        psi = c * math.cos(m2) - sin_t * math.sin(m2) - m3
    else:
        psi = torch.cos(m1 * torch.acos(c) + m2) - m3
    branch = _wrapped_branch(c, m1, m2, wrap_mode)
    if branch is not None:
        alt = c - m3 - (m2 * math.sin(m2) if wrap_mode == _FALLBACK else 0.0)
        psi = torch.where(branch, alt, psi)
    return psi


def margin_dpsi(c: Tensor, m1: float, m2: float, wrap_mode: int, grad_mode: int) -> Tensor:
    """psi'(c) as the design defines it (exact or straight-through)."""
    if grad_mode == _STRAIGHT:
        return torch.ones_like(c)
    sin_t = torch.sqrt(torch.clamp(1.0 - c * c, min=SIN2_MIN))
    if m1 == 1.0:
        d = math.cos(m2) + c * math.sin(m2) / sin_t
    else:
        d = m1 * torch.sin(m1 * torch.acos(c) + m2) / sin_t
    branch = _wrapped_branch(c, m1, m2, wrap_mode)
    if branch is not None:
        d = torch.where(branch, torch.ones_like(d), d)
    return d


class _Psi(torch.autograd.Function):
    """psi(c) with the design's derivative (autograd of acos/sqrt is infinite at +-1)."""

    @staticmethod
    def forward(ctx, c, m1, m2, m3, wrap_mode, grad_mode):
        ctx.save_for_backward(c)
        ctx.args = (m1, m2, wrap_mode, grad_mode)
        return margin_psi(c, m1, m2, m3, wrap_mode)

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        return grad * margin_dpsi(c, *ctx.args), None, None, None, None, None


def _clamp_straight_through(c: Tensor) -> Tensor:
    return c + (c.clamp(-1.0, 1.0) - c).detach()


def reference_cosines(x: Tensor, w: Tensor, index: Optional[Tensor], normalize: bool,
                      sub_centers: int) -> Tensor:
    """c [N, C]: clamped cosines (or plain dot products when normalize=False), after
    the max over sub-centers. ``index`` [C] selects classes of w (Partial FC sampling)."""
    k = sub_centers
    if index is not None:
        w = w.view(-1, k, w.shape[1])[index].reshape(-1, w.shape[1])
    if normalize:
        c = _clamp_straight_through(F.normalize(x, dim=1, eps=NORM_EPS)
                                    @ F.normalize(w, dim=1, eps=NORM_EPS).T)
    else:
        c = x @ w.T
    if k > 1:
        c = c.view(c.shape[0], -1, k).max(dim=2).values
    return c


def reference_logits(x: Tensor, w: Tensor, labels_local: Tensor, index: Optional[Tensor],
                     cfg: MarginConfig) -> Tuple[Tensor, Tensor]:
    """(z [N, C], c [N, C]): margin-adjusted scaled logits and the cosines.

    labels_local [N] int64 holds each row's target column, or -1 for no target here.
    """
    c = reference_cosines(x, w, index, cfg.normalize, cfg.sub_centers)
    has = labels_local >= 0
    col = labels_local.clamp(min=0).unsqueeze(1)
    if c.shape[1] == 0:
        return c * cfg.s, c
    c_t = c.gather(1, col).squeeze(1)
    psi_t = _Psi.apply(c_t, cfg.m1, cfg.m2, cfg.m3, cfg.wrap_code, cfg.grad_code)
    new_t = torch.where(has, psi_t, c_t)
    z = cfg.s * c.scatter(1, col, new_t.unsqueeze(1))
    return z, c


def reference_forward(x: Tensor, w: Tensor, labels_local: Tensor, index: Optional[Tensor],
                      cfg: MarginConfig):
    """The shared forward primitive (design section 3), materializing the logits.

    Returns (lse [N], target_logit [N] (0 without local target), sum_z [N],
    max_logit [N] (s * max cosine, no margin), argmax [N] int64 local class).
    """
    acc = acc_dtype(x.dtype)
    n = x.shape[0]
    z, c = reference_logits(x, w, labels_local, index, cfg)
    z = z.to(acc)
    if z.shape[1] == 0:
        ninf = torch.full((n,), -math.inf, dtype=acc, device=x.device)
        zero = torch.zeros(n, dtype=acc, device=x.device)
        return ninf, zero, zero.clone(), ninf.clone(), torch.zeros(n, dtype=torch.long,
                                                                    device=x.device)
    lse = torch.logsumexp(z, dim=1)
    has = labels_local >= 0
    tgt = torch.where(has, z.gather(1, labels_local.clamp(min=0).unsqueeze(1)).squeeze(1),
                      torch.zeros((), dtype=acc, device=x.device))
    cmax, arg = c.to(acc).max(dim=1)
    return lse, tgt, z.sum(dim=1), cfg.s * cmax, arg


def reference_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, s: float = 64.0,
                   m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                   margin_mode: str = "fallback", target_grad: str = "exact",
                   normalize: bool = True, sub_centers: int = 1,
                   label_smoothing: float = 0.0, ignore_index: int = -100,
                   reduction: str = "mean") -> Tensor:
    """The whole loss by plain autograd over materialized logits (the oracle).

    embeddings [N, D], weight [C*K, D], labels [N] int64 in [0, C) or ignore_index.
    Returns a scalar ("mean", "sum") or [N] ("none", 0 at ignored rows). "mean" divides
    by the number of rows not ignored (and is 0 when every row is ignored).
    """
    check_reduction(reduction)
    cfg = MarginConfig(s=s, m1=m1, m2=m2, m3=m3, margin_mode=margin_mode,
                       target_grad=target_grad, normalize=normalize, sub_centers=sub_centers)
    valid = labels != ignore_index
    labels_local = torch.where(valid, labels, torch.full_like(labels, -1))
    z, _ = reference_logits(embeddings, weight, labels_local, None, cfg)
    num_classes = z.shape[1]
    z_t = z.gather(1, labels_local.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = torch.logsumexp(z, dim=1) - (1.0 - label_smoothing) * z_t
    if label_smoothing:
        loss = loss - label_smoothing / num_classes * z.sum(dim=1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


# --- the reference as a backend of the shared primitive (ops "reference_fwd/bwd") -------
def _reference_fwd_op(x, w, labels, index, s, m1, m2, m3, wrap_mode, grad_mode, normalize,
                      sub_centers, grad_filter, block):
    cfg = MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize,
                                    sub_centers)
    with torch.no_grad():
        return reference_forward(x, w, labels, index, cfg)


def _reference_bwd_op(x, w, labels, index, lse, g_p, g_t, g_s, s, m1, m2, m3, wrap_mode,
                      grad_mode, normalize, sub_centers, grad_filter, block):
    # The naive backward: the chunked backward with a single chunk, i.e. every N x C
    # matrix materialized at once. (Autograd cannot run inside an op's kernel, which sits
    # below the autograd dispatch key; the oracle for gradients is reference_loss.)
    from .chunked import chunked_bwd
    if check_grad_filter(grad_filter) > 0:
        raise NotImplementedError("the reference backend computes the exact gradient: it "
                                  "has no gradient filter (grad_filter_eps must be None)")
    num_classes = index.numel() if index is not None else w.shape[0] // sub_centers
    return chunked_bwd(x, w, labels, index, lse, g_p, g_t, g_s, s, m1, m2, m3, wrap_mode,
                       grad_mode, normalize, sub_centers, 0.0, max(1, num_classes))


FWD_OP, BWD_OP = define_python_backend("reference", _reference_fwd_op, _reference_bwd_op)
