"""Collective helpers for the class-sharded loss (PartialFC), over torch.distributed.

Only three kinds of communication are used:

* :class:`GatherRows` all-gathers the embeddings [N, D] of every rank; its backward sums
  the gradients of the gathered rows over ranks and hands each rank its own rows (times a
  scale: insightface multiplies by the world size, see :class:`PartialFC`).
* :func:`gather_live` all-gathers small per-row statistics ([k, N] lse / target / sum_z
  partials) so that every rank can combine them; the rank's own slot stays in the autograd
  graph and the other ranks' slots are constants. Every rank then computes the same loss
  from the same numbers, so the gradient of that loss with respect to the rank's own
  partials is exact without any communication in the backward.
* :func:`gather_ints` / :func:`gather_objects` for labels and the input checks.

Nothing here touches CUDA at import time. With a world of one rank no collective is
issued and every helper is the identity (gather_rows still applies an explicit gradient
scale other than 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Comm:
    """The process group a sharded loss runs over (world 1: no communication)."""

    group: Any
    rank: int
    world: int

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def backend(self) -> str:
        if not self.distributed:
            return "none"
        return str(dist.get_backend(self.group)).lower()


def resolve_comm(process_group=None) -> Comm:
    """The rank and world size of ``process_group`` (the default group when None).

    Without an initialized torch.distributed (or with one rank) this is a world of one.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not "
                             "initialized (call torch.distributed.init_process_group first)")
        return Comm(None, 0, 1)
    return Comm(process_group, dist.get_rank(process_group),
                dist.get_world_size(process_group))


def _all_gather(t: Tensor, comm: Comm) -> List[Tensor]:
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(comm.world)]
    dist.all_gather(parts, t, group=comm.group)
    return parts


def gather_ints(t: Tensor, comm: Comm) -> Tensor:
    """All-gather equal-shape tensors and concatenate them along dim 0 (no autograd)."""
    if not comm.distributed:
        return t
    return torch.cat(_all_gather(t, comm))


def gather_objects(obj: Any, comm: Comm) -> List[Any]:
    """All-gather one picklable object per rank (only used on the error path)."""
    if not comm.distributed:
        return [obj]
    out: List[Any] = [None] * comm.world
    dist.all_gather_object(out, obj, group=comm.group)
    return out


def gather_live(t: Tensor, comm: Comm) -> Tensor:
    """[world, *t.shape]: every rank's ``t``; this rank's slot is ``t`` itself (in the
    autograd graph), the others are constants. Every rank must compute the same function
    of the result, which then back-propagates exactly into its own ``t``."""
    if not comm.distributed:
        return t.unsqueeze(0)
    parts = _all_gather(t.detach(), comm)
    parts[comm.rank] = t
    return torch.stack(parts)


class GatherRows(torch.autograd.Function):
    """x [N, D] on every rank -> [world * N, D] (rank-major), differentiable.

    Backward: the gradients of the gathered rows are summed over ranks (each rank only
    holds the part of the gradient that flows through its own class shard), this rank's
    N rows are kept and multiplied by ``grad_scale``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm, grad_scale: float) -> Tensor:
        ctx.comm, ctx.grad_scale, ctx.n = comm, grad_scale, x.shape[0]
        return torch.cat(_all_gather(x, comm))

    @staticmethod
    def backward(ctx, grad: Tensor):
        comm, n = ctx.comm, ctx.n
        grad = grad.contiguous()
        if comm.backend == "nccl":
            out = grad.new_empty((n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=comm.group)
        else:  # gloo has no reduce_scatter everywhere: all-reduce, keep our rows
            grad = grad.clone()
            dist.all_reduce(grad, group=comm.group)
            out = grad[comm.rank * n:(comm.rank + 1) * n]
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None


class ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def gather_rows(x: Tensor, comm: Comm, grad_scale: Optional[float] = None) -> Tensor:
    """All-gather the rows of ``x`` [N, D] -> [world * N, D]; gradients are reduced back
    to each rank's rows and scaled by ``grad_scale`` (default: the world size; in a world
    of one rank, only an explicit scale other than 1 changes anything)."""
    if not comm.distributed:
        if grad_scale is None or float(grad_scale) == 1.0:
            return x
        return ScaleGrad.apply(x, float(grad_scale))
    scale = float(comm.world) if grad_scale is None else float(grad_scale)
    return GatherRows.apply(x, comm, scale)
