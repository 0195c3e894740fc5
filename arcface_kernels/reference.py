"""Naive PyTorch reference: the oracle every backend is checked against.

The math every backend computes (x [N, D], w [C, D], labels y):

    a_i = 1 / max(|x_i|, eps)      b_j = 1 / max(|w_j|, eps)      (eps = 1e-12)
    c_ij = clamp(a_i b_j <x_i, w_j>, -1, 1)
    z_ij = s c_ij (j != y_i)       z_iy = s psi(c_iy),  psi(c) = cos(m1 acos(c) + m2) - m3
    loss_i = logsumexp_j z_ij - z_iy   (smoothing eps_ls: lse - (1 - eps_ls) z_iy
                                        - eps_ls / C sum_j z_ij)

and, where asked, three more terms per logit: the interclass filter (a non-target cosine
above t > 0 counts as 0), a bias b_j added after the scale, and the soft cap
z -> softcap tanh(z / softcap) last: z_ij = T(s u_ij + b_j).

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

* the clamp of the cosine to [-1, 1] passes the gradient straight through (the gradient
  formula above has no clamp term), and
* the target margin psi(c) has the derivative psi'(c) of docs/design.md: finite at c = +-1
  (sin(theta) is floored at ``SIN2_MIN``), 1 in the fallback / easy branches, and 1
  everywhere in straight-through mode.

The margin formulas psi and psi' come from the neutral module ``_math.py``; this module
imports no backend (a test checks it), so the oracle shares no code with the backends it
checks. Its backward op is the closed-form gradient over the materialized N x C matrices
(:func:`reference_backward`), written apart from the chunked backend's.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_bias, check_op_args
from ._config import MarginConfig, check_grad_filter, check_reduction
from ._math import NORM_EPS, SIN2_MIN, fallback_threshold, interclass_filtered, \
    margin_dpsi, margin_psi, radial_mask, softcap_grad, softcap_map
from ._ops import acc_dtype, define_python_backend, empty_dbias

__all__ = ["reference_loss", "reference_forward", "reference_backward", "reference_logits",
           "reference_cosines", "margin_psi", "margin_dpsi", "fallback_threshold",
           "NORM_EPS", "SIN2_MIN"]


class _Psi(torch.autograd.Function):
    """psi(c) with the derivative psi' of _math.py (autograd of acos/sqrt is infinite at +-1)."""

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


def shard_bias(bias: Optional[Tensor], index: Optional[Tensor]) -> Optional[Tensor]:
    """The bias of the shard's classes: bias[index] (or bias without an index)."""
    if bias is None or index is None:
        return bias
    return bias[index]


def reference_logits(x: Tensor, w: Tensor, labels_local: Tensor, index: Optional[Tensor],
                     cfg: MarginConfig, bias: Optional[Tensor] = None
                     ) -> Tuple[Tensor, Tensor]:
    """(z [N, C], c [N, C]): the logits z = T(s u + b) (margin at the target, interclass
    filter, bias, soft cap) and the cosines c.

    labels_local [N] int64 holds each row's target column, or -1 for no target here.
    bias: [classes of w] or None; ``index`` selects both w's classes and the bias.
    """
    c = reference_cosines(x, w, index, cfg.normalize, cfg.sub_centers)
    has = labels_local >= 0
    col = labels_local.clamp(min=0).unsqueeze(1)
    if c.shape[1] == 0:
        return c * cfg.s, c
    c_t = c.gather(1, col).squeeze(1)
    psi_t = _Psi.apply(c_t, cfg.m1, cfg.m2, cfg.m3, cfg.wrap_code, cfg.grad_code)
    new_t = torch.where(has, psi_t, c_t)
    is_t = torch.zeros_like(c, dtype=torch.bool).scatter(1, col, has.unsqueeze(1))
    u = c.scatter(1, col, new_t.unsqueeze(1))
    dropped = interclass_filtered(c, is_t, cfg.interclass_filtering_threshold)
    u = torch.where(dropped, torch.zeros_like(u), u)
    v = cfg.s * u
    b = shard_bias(bias, index)
    if b is not None:
        v = v + b.to(v.dtype)
    return softcap_map(v, cfg.softcap_arg), c


def reference_forward(x: Tensor, w: Tensor, labels_local: Tensor, index: Optional[Tensor],
                      cfg: MarginConfig, bias: Optional[Tensor] = None):
    """The shared forward primitive (docs/design.md section 3), materializing the logits.

    Returns (lse [N], target_logit [N] (0 without local target), sum_z [N],
    max_logit [N] (the capped max of s * cosine + bias, no margin, no filter),
    argmax [N] int64 local class).
    """
    acc = acc_dtype(x.dtype)
    n = x.shape[0]
    z, c = reference_logits(x, w, labels_local, index, cfg, bias)
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
    raw = cfg.s * c.to(acc)
    b = shard_bias(bias, index)
    if b is not None:
        raw = raw + b.to(acc)
    vmax, arg = raw.max(dim=1)
    return lse, tgt, z.sum(dim=1), softcap_map(vmax, cfg.softcap_arg), arg


def reference_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, s: float = 64.0,
                   m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                   margin_mode: str = "fallback", target_grad: str = "exact",
                   normalize: bool = True, sub_centers: int = 1,
                   label_smoothing: float = 0.0, ignore_index: int = -100,
                   reduction: str = "mean", bias: Optional[Tensor] = None,
                   softcap: Optional[float] = None,
                   interclass_filtering_threshold: float = 0.0) -> Tensor:
    """The whole loss by plain autograd over materialized logits (the oracle).

    embeddings [N, D], weight [C*K, D], labels [N] int64 in [0, C) or ignore_index;
    bias [C] or None (added to the logits after the scale), softcap (z -> softcap *
    tanh(z / softcap)), interclass_filtering_threshold (non-target cosines above it count
    as 0; 0 = off).
    Returns a scalar ("mean", "sum") or [N] ("none", 0 at ignored rows). "mean" divides
    by the number of rows not ignored (and is 0 when every row is ignored).
    """
    check_reduction(reduction)
    cfg = MarginConfig(s=s, m1=m1, m2=m2, m3=m3, margin_mode=margin_mode,
                       target_grad=target_grad, normalize=normalize, sub_centers=sub_centers,
                       softcap=softcap,
                       interclass_filtering_threshold=interclass_filtering_threshold)
    check_bias(bias, weight, sub_centers)
    valid = labels != ignore_index
    labels_local = torch.where(valid, labels, torch.full_like(labels, -1))
    z, _ = reference_logits(embeddings, weight, labels_local, None, cfg, bias)
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
def _reference_fwd_op(x, w, labels, index, bias, s, m1, m2, m3, wrap_mode, grad_mode,
                      normalize, sub_centers, softcap, interclass, grad_filter, block):
    check_op_args("reference", x, w, labels, index, sub_centers, bias=bias)
    cfg = MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize,
                                    sub_centers, softcap, interclass)
    with torch.no_grad():
        return reference_forward(x, w, labels, index, cfg, bias)


def reference_backward(x: Tensor, w: Tensor, labels_local: Tensor, index: Optional[Tensor],
                       lse: Tensor, g_p: Tensor, g_t: Tensor, g_s: Tensor,
                       cfg: MarginConfig, bias: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """The shared backward primitive in closed form over the materialized matrices.

    dL/dz_ij = g_p_i exp(z_ij - lse_i) + g_t_i [j = y_i] + g_s_i; dL/dv_ij = dL/dz_ij
    times the soft cap's derivative; dbias_j = sum_i dL/dv_ij; G_ij = dL/dc_ij is
    s dL/dv_ij, times psi'(c_iy) at the target, 0 where the interclass filter drops the
    logit; with x_hat = a x, w_hat = b w and the
    unclamped cosines S = x_hat w_hat^T (per row of w; with sub-centers G goes to each
    class's arg-max row):

        dx = a (G w_hat - r x_hat),  r_i = sum_j G_ij S_ij
        dw = b (G^T x_hat - q w_hat),  q_j = sum_i G_ij S_ij

    (without normalization dx = G w and dw = G^T x; r_i = 0 for a row with |x_i| <
    NORM_EPS, where x / eps is linear, and q_j likewise). Rows of w outside the shard
    get 0.
    Computed in float64 for float64 inputs, else float32; returned in the input dtypes.
    """
    acc = acc_dtype(x.dtype)
    n, k = x.shape[0], cfg.sub_centers
    rows = None
    wf = w.to(acc)
    if index is not None:
        rows = (index.unsqueeze(1) * k + torch.arange(k, device=w.device)).reshape(-1)
        wf = wf.index_select(0, rows)
    xf = x.to(acc)
    db = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
    if wf.shape[0] == 0 or n == 0:
        return torch.zeros_like(x), torch.zeros_like(w), \
            (empty_dbias(x, None) if db is None else db.to(bias.dtype))
    if cfg.normalize:
        a = 1.0 / torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp(min=NORM_EPS)
        b = 1.0 / torch.linalg.vector_norm(wf, dim=1, keepdim=True).clamp(min=NORM_EPS)
        # the forward's cosines exactly (F.normalize, as reference_cosines): a target at
        # a margin branch's threshold takes the same branch in both
        xh, wh = F.normalize(xf, dim=1, eps=NORM_EPS), F.normalize(wf, dim=1, eps=NORM_EPS)
    else:
        xh, wh = xf, wf
    raw = xh @ wh.T                                        # S [N, C*K]
    cos = raw.clamp(-1.0, 1.0) if cfg.normalize else raw
    if k > 1:
        c, kbest = cos.view(n, -1, k).max(dim=2)           # [N, C]
    else:
        c, kbest = cos, None
    has = labels_local >= 0
    col = labels_local.clamp(min=0).unsqueeze(1)
    c_t = c.gather(1, col).squeeze(1)
    u_t = margin_psi(c_t, cfg.m1, cfg.m2, cfg.m3, cfg.wrap_code)
    u = c.scatter(1, col, torch.where(has, u_t, c_t).unsqueeze(1))
    onehot = torch.zeros_like(c).scatter(1, col, has.to(acc).unsqueeze(1))
    dropped = interclass_filtered(c, onehot.bool(), cfg.interclass_filtering_threshold)
    v = cfg.s * torch.where(dropped, torch.zeros_like(u), u)
    bias_s = shard_bias(bias, index)
    if bias_s is not None:
        v = v + bias_s.to(acc)
    z = softcap_map(v, cfg.softcap_arg)
    lse, g_p, g_t, g_s = (t.to(acc).unsqueeze(1) for t in (lse, g_p, g_t, g_s))
    dz = g_p * torch.exp(z - lse) + g_s                    # dL/dz [N, C]
    dz = dz + onehot * g_t
    dv = dz * softcap_grad(v, cfg.softcap_arg)             # dL/dv
    if db is not None:
        col_sums = dv.sum(dim=0)
        db = db.index_add_(0, index, col_sums) if index is not None else db + col_sums
    dpsi = margin_dpsi(c_t, cfg.m1, cfg.m2, cfg.wrap_code, cfg.grad_code).unsqueeze(1)
    grad = cfg.s * dv * torch.where(onehot.bool(), dpsi, torch.ones_like(dz))
    grad = torch.where(dropped, torch.zeros_like(grad), grad)
    if k > 1:  # to the arg-max sub-center row of each class
        grad = torch.zeros(n, c.shape[1], k, dtype=acc, device=x.device).scatter(
            2, kbest.unsqueeze(2), grad.unsqueeze(2)).view(n, -1)
    dxh, dwh = grad @ wh, grad.T @ xh
    if cfg.normalize:
        # no radial term for a row whose norm is below NORM_EPS (radial_mask)
        r = (grad * raw).sum(dim=1, keepdim=True) * radial_mask(a)
        q = (grad * raw).sum(dim=0).unsqueeze(1) * radial_mask(b)
        dx = a * (dxh - r * xh)
        dws = b * (dwh - q * wh)
    else:
        dx, dws = dxh, dwh
    if rows is None:
        dw = dws
    else:
        dw = torch.zeros(w.shape, dtype=acc, device=w.device).index_add_(0, rows, dws)
    dbias = empty_dbias(x, None) if db is None else db.to(bias.dtype)
    return dx.to(x.dtype), dw.to(w.dtype), dbias


def _reference_bwd_op(x, w, labels, index, bias, lse, g_p, g_t, g_s, s, m1, m2, m3,
                      wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass,
                      grad_filter, block):
    check_op_args("reference", x, w, labels, index, sub_centers,
                  (("lse", lse), ("g_p", g_p), ("g_t", g_t), ("g_s", g_s)), bias=bias)
    # The closed form, not autograd: an op's kernel sits below the autograd dispatch key.
    # The end-to-end oracle for gradients is reference_loss (plain autograd).
    if check_grad_filter(grad_filter) > 0:
        raise NotImplementedError("the reference backend computes the exact gradient: it "
                                  "has no gradient filter (grad_filter_eps must be None)")
    cfg = MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize,
                                    sub_centers, softcap, interclass)
    with torch.no_grad():
        return reference_backward(x, w, labels, index, lse, g_p, g_t, g_s, cfg, bias)


FWD_OP, BWD_OP = define_python_backend("reference", _reference_fwd_op, _reference_bwd_op)
