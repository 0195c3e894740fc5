"""Chunked PyTorch backend: the shared primitive over class chunks.

The forward walks the classes in chunks of ``block`` and keeps an online logsumexp
(running max and rescaled sum of exponentials), so the largest temporaries are two
[N, block * K] matrices; the backward recomputes each chunk's logits and turns them into
dx and the chunk's rows of dw with two matmuls. Nothing of size N x C is ever held.

Half-precision inputs are computed in float32 (each chunk of w is upcast on the fly);
float64 stays float64, which is what gradcheck needs. Runs on any device torch runs on.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._config import MarginConfig
from ._ops import acc_dtype, define_python_backend
from .reference import NORM_EPS, margin_dpsi, margin_psi

# Default chunk: about 4M logits (16 MiB in float32) per temporary.
WORKSPACE_ELEMENTS = 1 << 22


def default_block(n: int, k: int) -> int:
    """Classes per chunk so that one [N, block*K] temporary holds ~WORKSPACE_ELEMENTS."""
    b = WORKSPACE_ELEMENTS // max(1, n * k)
    return max(16, b)


class _Shard:
    """The classes a call covers, their rows of w and a per-chunk view of them."""

    def __init__(self, w: Tensor, index: Optional[Tensor], k: int, acc: torch.dtype,
                 normalize: bool):
        self.w, self.index, self.k, self.acc, self.normalize = w, index, k, acc, normalize
        self.num_classes = index.numel() if index is not None else w.shape[0] // k

    def rows(self, j0: int, j1: int) -> Optional[Tensor]:
        """Row ids of w for classes j0..j1 of the shard (None: a contiguous slice)."""
        if self.index is None:
            return None
        cls = self.index[j0:j1]
        return (cls.unsqueeze(1) * self.k
                + torch.arange(self.k, device=cls.device)).reshape(-1)

    def chunk(self, j0: int, j1: int):
        """(w_hat [(j1-j0)*K, D] in acc dtype, normalized; b [(j1-j0)*K] inverse norms)."""
        rows = self.rows(j0, j1)
        wc = self.w[j0 * self.k:j1 * self.k] if rows is None else self.w.index_select(0, rows)
        wc = wc.to(self.acc)
        if not self.normalize:
            return wc, None
        b = torch.linalg.vector_norm(wc, dim=1).clamp_(min=NORM_EPS).reciprocal_()
        return wc * b.unsqueeze(1), b


def _normalized_rows(x: Tensor, acc: torch.dtype, normalize: bool):
    xf = x.to(acc)
    if not normalize:
        return xf, None
    a = torch.linalg.vector_norm(xf, dim=1).clamp_(min=NORM_EPS).reciprocal_()
    return xf * a.unsqueeze(1), a


def _cosines(xs: Tensor, wc: Tensor, cfg: MarginConfig):
    """Chunk cosines [N, nc] (after the sub-center max) and the arg-max sub-center."""
    c = xs @ wc.T
    if cfg.normalize:
        c.clamp_(-1.0, 1.0)
    if cfg.sub_centers > 1:
        c, kidx = c.view(c.shape[0], -1, cfg.sub_centers).max(dim=2)
        return c, kidx
    return c, None


def _targets(labels: Tensor, j0: int, j1: int):
    inside = (labels >= j0) & (labels < j1)
    col = (labels - j0).clamp(0, j1 - j0 - 1).unsqueeze(1)
    return inside, col


def chunked_fwd(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor], s: float,
                m1: float, m2: float, m3: float, wrap_mode: int, grad_mode: int,
                normalize: bool, sub_centers: int, block: int):
    cfg = MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers)
    acc = acc_dtype(x.dtype)
    n, dev = x.shape[0], x.device
    shard = _Shard(w, index, sub_centers, acc, normalize)
    xs, _ = _normalized_rows(x, acc, normalize)
    run_max = torch.full((n,), -math.inf, dtype=acc, device=dev)
    run_sum = torch.zeros(n, dtype=acc, device=dev)
    target = torch.zeros(n, dtype=acc, device=dev)
    sum_z = torch.zeros(n, dtype=acc, device=dev)
    best_c = torch.full((n,), -math.inf, dtype=acc, device=dev)
    argmax = torch.zeros(n, dtype=torch.long, device=dev)
    step = block if block > 0 else default_block(n, sub_centers)
    for j0 in range(0, shard.num_classes, step):
        j1 = min(shard.num_classes, j0 + step)
        wc, _ = shard.chunk(j0, j1)
        z, _ = _cosines(xs, wc, cfg)
        cmax, carg = z.max(dim=1)
        better = (cmax > best_c) | (j0 == 0)
        best_c = torch.where(better, cmax, best_c)
        argmax = torch.where(better, carg + j0, argmax)
        inside, col = _targets(labels, j0, j1)
        c_t = z.gather(1, col).squeeze(1)
        psi_t = margin_psi(c_t, m1, m2, m3, wrap_mode)
        z.scatter_(1, col, torch.where(inside, psi_t, c_t).unsqueeze(1))
        z.mul_(s)
        target += torch.where(inside, psi_t * s, torch.zeros_like(psi_t))
        sum_z += z.sum(dim=1)
        new_max = torch.maximum(run_max, z.amax(dim=1))
        run_sum = run_sum * torch.exp(run_max - new_max) \
            + z.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1)
        run_max = new_max
    lse = run_max + torch.log(run_sum)
    return lse, target, sum_z, best_c * s, argmax


def chunked_bwd(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor], lse: Tensor,
                g_p: Tensor, g_t: Tensor, g_s: Tensor, s: float, m1: float, m2: float,
                m3: float, wrap_mode: int, grad_mode: int, normalize: bool,
                sub_centers: int, block: int):
    cfg = MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers)
    acc = acc_dtype(x.dtype)
    n, k = x.shape[0], sub_centers
    shard = _Shard(w, index, k, acc, normalize)
    xs, a = _normalized_rows(x, acc, normalize)
    lse, g_p, g_t, g_s = (t.to(acc).unsqueeze(1) for t in (lse, g_p, g_t, g_s))
    dxs = torch.zeros_like(xs)
    r = torch.zeros(n, dtype=acc, device=x.device)
    dw = torch.zeros(w.shape, dtype=acc, device=w.device)
    step = block if block > 0 else default_block(n, k)
    for j0 in range(0, shard.num_classes, step):
        j1 = min(shard.num_classes, j0 + step)
        wc, b = shard.chunk(j0, j1)
        c, kidx = _cosines(xs, wc, cfg)
        inside, col = _targets(labels, j0, j1)
        c_t = c.gather(1, col)
        psi_t = margin_psi(c_t, m1, m2, m3, wrap_mode)
        # grad = s * dL/dz, computed in place on a copy of the logits
        grad = c.clone()
        grad.scatter_(1, col, torch.where(inside.unsqueeze(1), psi_t, c_t))
        grad.mul_(s).sub_(lse).exp_().mul_(g_p).add_(g_s)
        g_t_here = torch.where(inside.unsqueeze(1), g_t, torch.zeros_like(g_t))
        dpsi = torch.where(inside.unsqueeze(1), margin_dpsi(c_t, m1, m2, wrap_mode, grad_mode),
                           torch.ones_like(c_t))
        grad.scatter_(1, col, (grad.gather(1, col) + g_t_here) * dpsi)
        grad.mul_(s)
        if k > 1:  # the gradient flows to the arg-max sub-center only
            full = torch.zeros(n, j1 - j0, k, dtype=acc, device=x.device)
            full.scatter_(2, kidx.unsqueeze(2), grad.unsqueeze(2))
            grad = full.view(n, -1)
            cfull = torch.zeros_like(full)
            cfull.scatter_(2, kidx.unsqueeze(2), c.unsqueeze(2))
            c = cfull.view(n, -1)
        dxs.addmm_(grad, wc)
        dwc = grad.T @ xs
        if normalize:
            c.mul_(grad)
            r += c.sum(dim=1)
            q = c.sum(dim=0)
            dwc.sub_(q.unsqueeze(1) * wc).mul_(b.unsqueeze(1))
        rows = shard.rows(j0, j1)
        if rows is None:
            dw[j0 * k:j1 * k] = dwc
        else:
            dw.index_add_(0, rows, dwc)
    if normalize:
        dx = (dxs - r.unsqueeze(1) * xs).mul_(a.unsqueeze(1))
    else:
        dx = dxs
    return dx.to(x.dtype), dw.to(w.dtype)


FWD_OP, BWD_OP = define_python_backend("chunked", chunked_fwd, chunked_bwd)
