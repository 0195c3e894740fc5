"""The margin function psi and its derivative psi': the one home of these formulas in
Python (docs/design.md sections 1 and 2).

A neutral module: it imports no backend, so the reference (the oracle) and the chunked
backend both take the formulas from here without one depending on the other. The Triton
kernels carry the same formulas in ``triton_kernels/math.py`` and the C++ / CUDA kernels in
``csrc/arcface_math.h``.

    psi(c) = cos(m1 acos(c) + m2) - m3,  c = cos(theta) in [-1, 1]

with the wrap modes where m1 theta + m2 passes pi: "fallback" (psi = c - m2 sin m2 - m3
past the threshold cos(min((pi - m2) / m1, pi))), "easy" (psi = c - m3 where c <= 0) and
"none" (as written). psi'(c) = m1 sin(m1 theta + m2) / sin(theta), with sin(theta)^2
floored at SIN2_MIN so that it is finite at c = +-1; 1 in the fallback / easy branches;
1 everywhere with the straight-through target gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._config import GRAD_MODES, WRAP_MODES

NORM_EPS = 1e-12   # inverse norms are 1 / max(|v|, NORM_EPS), as F.normalize
SIN2_MIN = 1e-12   # floor of sin(theta)^2 in psi'(c), so that psi' is finite at c = +-1

_FALLBACK = WRAP_MODES["fallback"]
_EASY = WRAP_MODES["easy"]
_STRAIGHT = GRAD_MODES["straight_through"]


def radial_mask(inv: Tensor) -> Tensor:
    """Where a row's normalization has a radial gradient term: its inverse norm
    ``inv`` = 1 / max(|v|, NORM_EPS) is below 1 / NORM_EPS. Below the floor v / eps is
    linear in v, so the gradient is inv * u, without the term - r inv^2 v (F.normalize's
    own derivative there)."""
    return inv < 1.0 / torch.tensor(NORM_EPS, dtype=inv.dtype, device=inv.device)


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
    """Target logit before scaling: psi(c) = cos(m1*acos(c) + m2) - m3, with wrap modes.
    ``c`` must already be clamped to [-1, 1]."""
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
    """psi'(c), exact (with the SIN2_MIN floor) or straight-through (1)."""
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


def softcap_map(v: Tensor, softcap: float) -> Tensor:
    """z = softcap * tanh(v / softcap) (Gemma 2's logit soft-capping); v when softcap
    is 0 (off)."""
    if not softcap:
        return v
    return softcap * torch.tanh(v / softcap)


def softcap_grad(v: Tensor, softcap: float) -> Tensor:
    """dz/dv of :func:`softcap_map`: 1 - tanh(v / softcap)^2 (1 when off)."""
    if not softcap:
        return torch.ones_like(v)
    t = torch.tanh(v / softcap)
    return 1.0 - t * t


def interclass_filtered(c: Tensor, is_target: Tensor, threshold: float) -> Tensor:
    """Where insightface's interclass filter drops a logit: a non-target cosine above
    ``threshold`` (> 0; 0 = off, nothing dropped). A dropped logit counts as u = 0, in
    value and gradient. NaN is never dropped."""
    if not threshold:
        return torch.zeros_like(c, dtype=torch.bool)
    return (c > threshold) & ~is_target
