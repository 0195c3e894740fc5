"""Chunked PyTorch backend: the shared primitive over class chunks.

The classes are walked in chunks of ``block`` classes (the API's chunk_size; by default
as many as fit WORKSPACE_BYTES), in the forward and in the backward; each chunk's logits
s * c [N, block*K] come from one matmul and are reduced on the spot, so the largest temporary is one such
matrix and nothing of size N x C is ever held. Choices that keep the passes over each
chunk few (the elementwise passes, not the matmuls, dominate on CPUs):

* s is folded into the normalized embeddings, so the matmul yields z = s * c directly.
* The target logits are computed once per call from the label rows of w (an [N, K, D]
  gather), not fished out of the chunks: in a chunk the target entry is set to -inf in
  the forward (its margin term joins the logsumexp separately) and overwritten with its
  gradient in the backward.
* Forward: one max (values and arg-max) over the chunk with the target masked out serves
  both the top-1 and the shift of the chunk's sum of exponentials (merged across chunks
  with ``torch.logaddexp``): four passes over the chunk in all.
* Backward: G = s * (g_p * exp(z - lse) + g_s) in place (three or four passes), then
  dX += G @ w_hat and the chunk's dW = G^T @ x_hat. The normalization terms
  r_i = sum_j G_ij c_ij and q_j = sum_i G_ij c_ij are <x_hat_i, dX_i> and <w_hat_j, dW_j>:
  O((N + C) D) work after the matmuls, not two more passes over the chunk.
* Non-target cosines are not clamped to [-1, 1]: the clamp guards acos / sqrt in the
  margin, which only the target meets (its cosine is clamped), and it can change a
  non-target logit s * c only by a rounding error of c, below the logit's own resolution.
* Row reductions over [block, D] use vecdot / mv (BLAS-like kernels), not mul + sum.
* With a bias, a soft cap or the interclass filter (the LLM-head and insightface terms)
  each chunk's logits are built in full (``_chunk_terms``): the tricks above assume
  z = s c off the target.

Half-precision inputs are computed in float32 (each chunk of w is upcast on the fly);
float64 stays float64, which is what gradcheck needs. Runs on any device torch runs on.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._checks import check_op_args
from ._config import WORKSPACE_BYTES, MarginConfig, check_grad_filter
from ._ops import acc_dtype, define_python_backend, empty_dbias
from ._math import NORM_EPS, interclass_filtered, margin_dpsi, margin_psi, radial_mask, \
    softcap_grad, softcap_map

def default_block(n: int, k: int, acc: torch.dtype) -> int:
    """Classes per chunk so that one [N, block*K] temporary in the accumulation dtype
    holds at most WORKSPACE_BYTES (at least one class)."""
    elem = torch.empty((), dtype=acc).element_size()
    return max(1, WORKSPACE_BYTES // max(1, n * k * elem))


class _Shard:
    """The classes a call covers, their rows of w (normalized chunk by chunk)."""

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
        """(w_hat [(j1-j0)*K, D] in acc dtype, normalized; b [(j1-j0)*K, 1] inverse norms
        or None without normalization)."""
        rows = self.rows(j0, j1)
        wc = self.w[j0 * self.k:j1 * self.k] if rows is None else self.w.index_select(0, rows)
        wc = wc.to(self.acc)
        if not self.normalize:
            return wc, None
        b = _inverse_norms(wc).unsqueeze(1)
        return wc * b, b

    def target_rows(self, labels: Tensor) -> Tensor:
        """[N, K] row ids of each row's target class (label -1 reads class 0: masked)."""
        pos = labels.clamp(min=0)
        cls = self.index[pos] if self.index is not None else pos
        return cls.unsqueeze(1) * self.k + torch.arange(self.k, device=cls.device)


def _inverse_norms(v: Tensor) -> Tensor:
    """1 / max(|v_i|, eps) over the last dim."""
    return torch.linalg.vector_norm(v, dim=-1).clamp_(min=NORM_EPS).reciprocal_()


def _normalized_rows(x: Tensor, acc: torch.dtype, normalize: bool):
    """(x_hat [N, D] in acc dtype, a [N, 1] inverse norms or None)."""
    xf = x.to(acc)
    if not normalize:
        return xf, None
    a = _inverse_norms(xf).unsqueeze(1)
    return xf * a, a


def _target_cosines(xh: Tensor, shard: _Shard, labels: Tensor, normalize: bool) -> Tensor:
    """c_i,y_i [N] (max over the K sub-centers; clamped when normalized; 0 without a
    target in the shard)."""
    n = xh.shape[0]
    if shard.num_classes == 0 or n == 0:
        return torch.zeros(n, dtype=xh.dtype, device=xh.device)
    rows = shard.target_rows(labels)
    wt = shard.w.index_select(0, rows.reshape(-1)).view(n, shard.k, -1).to(xh.dtype)
    if normalize:
        wt = wt * _inverse_norms(wt).unsqueeze(2)
    c = torch.linalg.vecdot(xh.unsqueeze(1), wt).amax(dim=1)
    if normalize:
        c = c.clamp(-1.0, 1.0)
    return torch.where(labels >= 0, c, torch.zeros_like(c))


def _chunk_logits(xs: Tensor, wc: Tensor, k: int):
    """z = s * c for one chunk [N, nc] (after the sub-center max) and the arg-max
    sub-center [N, nc] (None for K = 1)."""
    z = xs @ wc.T
    if k > 1:
        z, kidx = z.view(z.shape[0], -1, k).max(dim=2)
        return z, kidx
    return z, None


def _targets(labels: Tensor, j0: int, j1: int):
    """(rows whose target is in classes j0..j1 [N, 1], column of it in the chunk [N, 1])."""
    inside = ((labels >= j0) & (labels < j1)).unsqueeze(1)
    col = (labels - j0).clamp(0, j1 - j0 - 1).unsqueeze(1)
    return inside, col


def _chunk_bias(bias: Optional[Tensor], shard: _Shard, j0: int, j1: int, acc):
    """The bias of the shard's classes j0..j1 [1, j1 - j0] in acc dtype (None: no bias)."""
    if bias is None:
        return None
    b = bias[j0:j1] if shard.index is None else bias.index_select(0, shard.index[j0:j1])
    return b.to(acc).unsqueeze(0)


class _Chunk(NamedTuple):
    """One chunk's logits with every term: c [N, nc] (cosines, sub-center max), kidx
    (arg-max sub-center or None), is_t (target mask [N, nc]), inside / col (rows whose
    target is in the chunk [N, 1], its column [N, 1]), dropped (the filter's mask or
    None), v = s u + b and z = T(v)."""
    c: Tensor
    kidx: Optional[Tensor]
    is_t: Tensor
    inside: Tensor
    col: Tensor
    dropped: Optional[Tensor]
    v: Tensor
    z: Tensor


def _chunk_terms(xh: Tensor, wc: Tensor, labels: Tensor, bias_c: Optional[Tensor],
                 cfg: MarginConfig, j0: int, j1: int) -> _Chunk:
    """One chunk's logits with every term (docs/design.md section 1)."""
    c, kidx = _chunk_logits(xh, wc, cfg.sub_centers)
    if cfg.normalize:
        c = c.clamp(-1.0, 1.0)
    inside, col = _targets(labels, j0, j1)
    is_t = torch.zeros_like(c, dtype=torch.bool).scatter_(1, col, inside)
    c_t = c.gather(1, col)
    u = c.scatter(1, col, torch.where(
        inside, margin_psi(c_t, cfg.m1, cfg.m2, cfg.m3, cfg.wrap_code), c_t))
    dropped = None
    if cfg.interclass_filtering_threshold:
        dropped = interclass_filtered(c, is_t, cfg.interclass_filtering_threshold)
        u.masked_fill_(dropped, 0.0)
    v = u.mul_(cfg.s)
    if bias_c is not None:
        v.add_(bias_c)
    return _Chunk(c, kidx, is_t, inside, col, dropped, v, softcap_map(v, cfg.softcap_arg))


def _walk(shard: _Shard, bias: Optional[Tensor], block: int, n: int, acc):
    """The chunks of classes of a call: (j0, j1, w_hat chunk, its inverse norms, its
    bias [1, j1 - j0] or None)."""
    step = block if block > 0 else default_block(n, shard.k, acc)
    for j0 in range(0, shard.num_classes, step):
        j1 = min(shard.num_classes, j0 + step)
        wc, b = shard.chunk(j0, j1)
        yield j0, j1, wc, b, _chunk_bias(bias, shard, j0, j1, acc)


def _fwd_terms(x, w, labels, index, bias, cfg: MarginConfig, block: int):
    """The forward with bias / soft cap / interclass filter, chunk by chunk."""
    acc = acc_dtype(x.dtype)
    n, k, dev = x.shape[0], cfg.sub_centers, x.device
    shard = _Shard(w, index, k, acc, cfg.normalize)
    xh, _ = _normalized_rows(x, acc, cfg.normalize)
    lse = torch.full((n,), -math.inf, dtype=acc, device=dev)
    best = torch.full((n,), -math.inf, dtype=acc, device=dev)
    argmax = torch.zeros(n, dtype=torch.long, device=dev)
    target = torch.zeros(n, dtype=acc, device=dev)
    sum_z = torch.zeros(n, dtype=acc, device=dev)
    for j0, j1, wc, _, bias_c in _walk(shard, bias, block, n, acc):
        c, _, is_t, _, _, _, _, z = _chunk_terms(xh, wc, labels, bias_c, cfg, j0, j1)
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
        target += torch.where(is_t, z, torch.zeros_like(z)).sum(dim=1)
        sum_z += z.sum(dim=1)
        raw = c.mul_(cfg.s) if bias_c is None else c.mul_(cfg.s).add_(bias_c)
        m, arg = raw.max(dim=1)
        better = (m > best) | (j0 == 0)
        best = torch.where(better, m, best)
        argmax = torch.where(better, arg + j0, argmax)
    return lse, target, sum_z, softcap_map(best, cfg.softcap_arg), argmax


def _add_chunk_grad(grad: Tensor, kidx: Optional[Tensor], wc: Tensor, b: Optional[Tensor],
                    xh: Tensor, dxs: Tensor, dw: Tensor, shard: _Shard, j0: int, j1: int,
                    normalize: bool) -> None:
    """dX += G w_hat and dW[chunk] = b (G^T x_hat - q w_hat) for one chunk's
    G = dL/dc [N, nc] (the sub-center scatter first)."""
    n, k = grad.shape[0], shard.k
    if k > 1:  # the gradient flows to the arg-max sub-center only
        full = torch.zeros(n, j1 - j0, k, dtype=grad.dtype, device=grad.device)
        full.scatter_(2, kidx.unsqueeze(2), grad.unsqueeze(2))
        grad = full.view(n, -1)
    dxs.addmm_(grad, wc)
    dwc = grad.T @ xh
    if normalize:  # dW_j = b_j (sum_i G_ij x_hat_i - q_j w_hat_j), q_j = <w_hat_j, .>
        q = torch.linalg.vecdot(wc, dwc).unsqueeze(1) * radial_mask(b)
        dwc.addcmul_(q, wc, value=-1.0).mul_(b)
    rows = shard.rows(j0, j1)
    if rows is None:
        dw[j0 * k:j1 * k] = dwc
    else:
        dw.index_add_(0, rows, dwc)


def _finish_dx(dxs: Tensor, xh: Tensor, a: Optional[Tensor], normalize: bool) -> Tensor:
    """dx_i = a_i (sum_j G_ij w_hat_j - r_i x_hat_i), r_i = <x_hat_i, .> (normalized)."""
    if not normalize:
        return dxs
    r = torch.linalg.vecdot(xh, dxs).unsqueeze(1) * radial_mask(a)
    return dxs.addcmul_(r, xh, value=-1.0).mul_(a)


def _bwd_terms(x, w, labels, index, bias, lse, g_p, g_t, g_s, cfg: MarginConfig,
               grad_filter: float, block: int):
    """The backward with bias / soft cap / interclass filter, chunk by chunk."""
    acc = acc_dtype(x.dtype)
    n, k = x.shape[0], cfg.sub_centers
    shard = _Shard(w, index, k, acc, cfg.normalize)
    xh, a = _normalized_rows(x, acc, cfg.normalize)
    lse, g_p, g_t, g_s = (t.to(acc).unsqueeze(1) for t in (lse, g_p, g_t, g_s))
    dxs = torch.zeros_like(xh)
    dw = torch.zeros(w.shape, dtype=acc, device=w.device)
    db = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
    for j0, j1, wc, b, bias_c in _walk(shard, bias, block, n, acc):
        c, kidx, is_t, inside, col, dropped, v, z = _chunk_terms(xh, wc, labels, bias_c,
                                                                 cfg, j0, j1)
        p = z.sub_(lse).exp_()
        if grad_filter > 0:  # the filter: p < eps of a non-target counts as 0
            p.masked_fill_((p < grad_filter) & ~is_t, 0.0)
        dv = p.mul_(g_p).add_(g_s).add_(torch.where(is_t, g_t, torch.zeros_like(p)))
        if cfg.softcap_arg:
            dv.mul_(softcap_grad(v, cfg.softcap_arg))
        if db is not None:
            if shard.index is None:
                db[j0:j1] += dv.sum(dim=0)
            else:
                db.index_add_(0, shard.index[j0:j1], dv.sum(dim=0))
        grad = dv.mul_(cfg.s)
        dpsi_t = margin_dpsi(c.gather(1, col), cfg.m1, cfg.m2, cfg.wrap_code, cfg.grad_code)
        grad.scatter_(1, col, grad.gather(1, col) * torch.where(inside, dpsi_t, 1.0))
        if dropped is not None:
            grad.masked_fill_(dropped, 0.0)
        _add_chunk_grad(grad, kidx, wc, b, xh, dxs, dw, shard, j0, j1, cfg.normalize)
    dx = _finish_dx(dxs, xh, a, cfg.normalize)
    dbias = empty_dbias(x, None) if db is None else db.to(bias.dtype)
    return dx.to(x.dtype), dw.to(w.dtype), dbias


def chunked_fwd(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor], s: float,
                m1: float, m2: float, m3: float, wrap_mode: int, grad_mode: int,
                normalize: bool, sub_centers: int, grad_filter: float, block: int):
    acc = acc_dtype(x.dtype)
    n, k, dev = x.shape[0], sub_centers, x.device
    shard = _Shard(w, index, k, acc, normalize)
    xh, _ = _normalized_rows(x, acc, normalize)
    xs = xh * s
    has = labels >= 0
    c_t = _target_cosines(xh, shard, labels, normalize)
    z_t = s * margin_psi(c_t, m1, m2, m3, wrap_mode)
    lse = torch.full((n,), -math.inf, dtype=acc, device=dev)
    best = torch.full((n,), -math.inf, dtype=acc, device=dev)
    argmax = torch.zeros(n, dtype=torch.long, device=dev)
    sum_raw = torch.zeros(n, dtype=acc, device=dev)
    w_sum = torch.zeros(x.shape[1], dtype=acc, device=dev)  # sum of w_hat (K = 1)
    step = block if block > 0 else default_block(n, k, acc)
    for j0 in range(0, shard.num_classes, step):
        j1 = min(shard.num_classes, j0 + step)
        wc, _ = shard.chunk(j0, j1)
        z, _ = _chunk_logits(xs, wc, k)
        if k == 1:  # sum_j c_ij = <x_hat_i, sum_j w_hat_j>
            w_sum += torch.mv(wc.T, torch.ones(wc.shape[0], dtype=acc, device=dev))
        else:
            sum_raw += z.sum(dim=1)
        inside, col = _targets(labels, j0, j1)
        z_col = z.gather(1, col)
        z.scatter_(1, col, torch.where(inside, -math.inf, z_col))
        m, arg = z.max(dim=1, keepdim=True)
        # top-1 of the unmasked chunk (first index on ties, as torch.max)
        take_t = inside & ((z_col > m) | ((z_col == m) & (col < arg)))
        cmax = torch.where(take_t, z_col, m).squeeze(1)
        carg = torch.where(take_t, col, arg).squeeze(1)
        better = (cmax > best) | (j0 == 0)
        best = torch.where(better, cmax, best)
        argmax = torch.where(better, carg + j0, argmax)
        shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # all-masked chunk row
        chunk_sum = z.sub_(shift).exp_().sum(dim=1)
        lse = torch.logaddexp(lse, shift.squeeze(1) + torch.log(chunk_sum))
    lse = torch.where(has, torch.logaddexp(lse, z_t), lse)
    if k == 1:
        sum_raw = xs @ w_sum
    sum_z = sum_raw + torch.where(has, z_t - s * c_t, torch.zeros_like(z_t))
    target = torch.where(has, z_t, torch.zeros_like(z_t))
    return lse, target, sum_z, best, argmax


def chunked_bwd(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor], lse: Tensor,
                g_p: Tensor, g_t: Tensor, g_s: Tensor, s: float, m1: float, m2: float,
                m3: float, wrap_mode: int, grad_mode: int, normalize: bool,
                sub_centers: int, grad_filter: float, block: int):
    grad_filter = check_grad_filter(grad_filter)
    acc = acc_dtype(x.dtype)
    n, k = x.shape[0], sub_centers
    shard = _Shard(w, index, k, acc, normalize)
    xh, a = _normalized_rows(x, acc, normalize)
    xs = xh * s
    lse, g_p, g_t, g_s = (t.to(acc) for t in (lse, g_p, g_t, g_s))
    has = labels >= 0
    c_t = _target_cosines(xh, shard, labels, normalize)
    z_t = s * margin_psi(c_t, m1, m2, m3, wrap_mode)
    # G at the target: s * dL/dz_iy * psi'(c_iy)
    grad_t = s * (g_p * torch.exp(z_t - lse) + g_s + g_t) \
        * margin_dpsi(c_t, m1, m2, wrap_mode, grad_mode)
    grad_t = torch.where(has, grad_t, torch.zeros_like(grad_t)).unsqueeze(1)
    coef_p, coef_s = (s * g_p).unsqueeze(1), (s * g_s).unsqueeze(1)
    smoothing = bool((g_s != 0).any())
    lse = lse.unsqueeze(1)
    dxs = torch.zeros_like(xh)
    dw = torch.zeros(w.shape, dtype=acc, device=w.device)
    step = block if block > 0 else default_block(n, k, acc)
    for j0 in range(0, shard.num_classes, step):
        j1 = min(shard.num_classes, j0 + step)
        wc, b = shard.chunk(j0, j1)
        grad, kidx = _chunk_logits(xs, wc, k)
        grad.sub_(lse).exp_()                          # p_ij
        if grad_filter > 0:                            # the filter: p < eps counts as 0
            grad.masked_fill_(grad < grad_filter, 0.0)
        grad.mul_(coef_p)                              # s * g_p * p_ij
        if smoothing:
            grad.add_(coef_s)
        inside, col = _targets(labels, j0, j1)
        grad.scatter_(1, col, torch.where(inside, grad_t, grad.gather(1, col)))
        _add_chunk_grad(grad, kidx, wc, b, xh, dxs, dw, shard, j0, j1, normalize)
    dx = _finish_dx(dxs, xh, a, normalize)
    return dx.to(x.dtype), dw.to(w.dtype)


def _has_terms(bias: Optional[Tensor], cfg: MarginConfig) -> bool:
    return bias is not None or bool(cfg.softcap_arg) \
        or bool(cfg.interclass_filtering_threshold)


def _chunked_fwd_op(x, w, labels, index, bias, s, m1, m2, m3, wrap_mode, grad_mode,
                    normalize, sub_centers, softcap, interclass, grad_filter, block):
    check_op_args("chunked", x, w, labels, index, sub_centers, bias=bias)
    cfg = MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize,
                                    sub_centers, softcap, interclass)
    if _has_terms(bias, cfg):
        return _fwd_terms(x, w, labels, index, bias, cfg, block)
    return chunked_fwd(x, w, labels, index, s, m1, m2, m3, wrap_mode, grad_mode, normalize,
                       sub_centers, grad_filter, block)


def _chunked_bwd_op(x, w, labels, index, bias, lse, g_p, g_t, g_s, s, m1, m2, m3,
                    wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass,
                    grad_filter, block):
    check_op_args("chunked", x, w, labels, index, sub_centers,
                  (("lse", lse), ("g_p", g_p), ("g_t", g_t), ("g_s", g_s)), bias=bias)
    cfg = MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize,
                                    sub_centers, softcap, interclass)
    if _has_terms(bias, cfg):
        return _bwd_terms(x, w, labels, index, bias, lse, g_p, g_t, g_s, cfg,
                          check_grad_filter(grad_filter), block)
    dx, dw = chunked_bwd(x, w, labels, index, lse, g_p, g_t, g_s, s, m1, m2, m3, wrap_mode,
                         grad_mode, normalize, sub_centers, grad_filter, block)
    return dx, dw, empty_dbias(x, None)


FWD_OP, BWD_OP = define_python_backend("chunked", _chunked_fwd_op, _chunked_bwd_op)
