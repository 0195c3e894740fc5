"""PartialFC: the margin-softmax head with its classes sharded over torch.distributed ranks,
with optional Partial FC class sampling and sub-centers.

A drop-in for insightface's ``PartialFC_V2`` (model parallel over classes) that never holds
the N x C logits, written once above the backend primitive (``_ops.py``):

1. Every rank all-gathers the embeddings [N, D] and labels [N] of the group (N rows per
   rank, the same N on every rank), so it sees the global batch [W * N, D].
2. Rank r owns the contiguous classes ``class_start .. class_start + num_local - 1``
   (insightface's split: ``num_local = C // W + (r < C % W)``,
   ``class_start = C // W * r + min(r, C % W)``) and the weight shard
   ``weight`` [num_local * K, D]. It calls the backend's forward op on its shard (global
   labels mapped to shard positions, -1 where the target lives on another rank), which
   returns per-row partials: lse, the target logit (0 elsewhere) and sum_z.
3. The partials ([k, W * N] per rank) are all-gathered; every rank combines them the same
   way (logsumexp of the lse partials, sum of the targets), so the loss is identical on
   every rank: the mean over the global batch, ignore_index rows excluded.
4. Backward: autograd through the forward op's registration gives each rank the exact
   gradient of its weight shard (never communicated) and the part of the gathered
   embeddings' gradient that flows through its shard; those are summed over ranks and
   each rank keeps its own rows.

Gradient convention for the local embeddings (as insightface): they receive
``world_size`` times the true gradient of the (global-mean) loss. DistributedDataParallel
averages the backbone's gradients over ranks, and each rank's backbone only sees its own
rows, so the average of the scaled gradients is the true gradient of the loss. Without
DDP, divide by the world size (or pass ``embedding_grad_scale=1.0``).

Partial FC sampling (``sample_rate < 1``, as insightface): each rank keeps the classes of
its shard that are targets somewhere in the global batch ("positives") plus uniformly
drawn negatives, ``num_sample = int(sample_rate * num_local)`` classes in all (only the
positives if there are more of them). The sampled shard positions (sorted) are passed to
the kernels as ``index``: they read those rows of w through it, no copy of W[index] is
made, and dW is nonzero only on those rows. ``weight_index`` holds the last sample.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._checks import check_loss_inputs
from ._config import LossOptions, MarginConfig, check_positive_int
from ._ops import acc_dtype, autocast_off, local_labels
from .backends import resolve_backend
from .distributed import Comm, gather_ints, gather_live, gather_objects, gather_rows, \
    resolve_comm
from .loss import LossStats, check_prob_floor, combine_loss_rows, floor_probability, \
    reduce_rows
from .module import MarginAttributes

_FLOAT_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def shard_range(num_classes: int, world_size: int, rank: int):
    """(class_start, num_local) of ``rank``: insightface PartialFC_V2's class split."""
    num_local = num_classes // world_size + int(rank < num_classes % world_size)
    class_start = num_classes // world_size * rank + min(rank, num_classes % world_size)
    return class_start, num_local


class PartialFC(MarginAttributes, nn.Module):
    """Class-sharded margin-softmax loss over a torch.distributed group (NCCL or gloo).

    Args:
        embedding_size: D.
        num_classes: C, the total number of classes over all ranks.
        sample_rate: fraction of this rank's classes in each step's softmax, in (0, 1];
            1.0 (default) uses every class, exactly.
        s, m1, m2, m3, margin_mode, target_grad, label_smoothing, normalize, sub_centers,
        chunk_size, backend, grad_filter_eps: as :func:`arcface_kernels.arcface_loss`.
            With sampling, label smoothing's C is the number of classes in the softmax
            (sampled, all ranks).
        reduction: "mean" (default: over the global batch's rows not ignored), "sum", or
            "none" (the [W * N] per-row losses of the global batch, rank-major).
        interclass_filtering_threshold, prob_floor: as
            :class:`arcface_kernels.ArcFaceLoss` (insightface's options).
        fp16: compute the logits in float16, as insightface's ``fp16=True``: the
            embeddings and the rows of the weight in this step's softmax (the sampled ones,
            with sample_rate < 1) are cast to float16, the float32 shard is not.
        ignore_index: label of rows that do not count.
        process_group: the group the classes are sharded over; None = the default group,
            or a single device when torch.distributed is not initialized. Resolved at
            construction: build the module after init_process_group.
        generator: torch.Generator (on the weight's device) for the negative sampling;
            None uses torch's global generator.
        embedding_grad_scale: factor on the local embeddings' gradient; None = world size
            (insightface's convention, see the module docstring).
        track_stats: keep :class:`LossStats` of the global batch in ``last_stats`` (top-1
            prediction, a global class id; with sampling, among the sampled classes);
            costs one more all-gather of N-vectors.
        device, dtype: of ``weight``.

    Attributes:
        weight: this rank's shard [num_local * sub_centers, D], init N(0, 0.01).
        class_start, num_local: the shard's class range; rank, world_size.
        num_sample: classes sampled per step (sample_rate < 1).
        weight_index: the last step's sampled shard positions (int64, sorted) or None.

    forward(local_embeddings [N, D], local_labels [N] (or [N, 1]), any integer dtype) ->
    the loss (float32; float64 for float64 embeddings), equal on every rank. Every rank
    must call forward and backward (they communicate), with the same N.

    ``s``, ``m1``, ``m2``, ``m3`` and ``interclass_filtering_threshold`` are settable
    attributes (:class:`~arcface_kernels.module.MarginAttributes`). :meth:`from_insightface`
    takes insightface ``PartialFC_V2``'s own arguments.
    """

    def __init__(self, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, *,
                 margin_mode: str = "fallback", target_grad: str = "exact",
                 label_smoothing: float = 0.0, normalize: bool = True, sub_centers: int = 1,
                 interclass_filtering_threshold: float = 0.0,
                 prob_floor: Optional[float] = None, fp16: bool = False,
                 reduction: str = "mean", ignore_index: int = -100,
                 chunk_size: Optional[int] = None, backend: str = "auto",
                 grad_filter_eps: Optional[float] = None,
                 process_group: Optional["torch.distributed.ProcessGroup"] = None,
                 generator: Optional[torch.Generator] = None,
                 embedding_grad_scale: Optional[float] = None, track_stats: bool = False,
                 device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(embedding_size, int) and hasattr(embedding_size, "m2"):
            raise TypeError(f"embedding_size must be a positive int, got a margin loss "
                            f"({type(embedding_size).__name__}): insightface's argument "
                            f"order PartialFC_V2(margin_loss, embedding_size, num_classes, "
                            f"sample_rate, fp16) is PartialFC.from_insightface(...)")
        self.embedding_size = check_positive_int("embedding_size", embedding_size)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) \
                or not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        self.cfg = MarginConfig(s=s, m1=m1, m2=m2, m3=m3, margin_mode=margin_mode,
                                target_grad=target_grad, normalize=normalize,
                                sub_centers=sub_centers,
                                interclass_filtering_threshold=interclass_filtering_threshold)
        if not isinstance(fp16, bool):
            raise TypeError(f"fp16 must be a bool, got {fp16!r}")
        self.fp16 = fp16
        self.prob_floor = check_prob_floor(prob_floor)
        opts = LossOptions(reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, chunk_size=chunk_size,
                           backend=backend, grad_filter_eps=grad_filter_eps)
        self.block, self.grad_filter = opts.block, opts.grad_filter
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
        if embedding_grad_scale is not None and (
                isinstance(embedding_grad_scale, bool)
                or not isinstance(embedding_grad_scale, (int, float))
                or not math.isfinite(embedding_grad_scale)):
            raise ValueError(f"embedding_grad_scale must be a finite number or None, "
                             f"got {embedding_grad_scale!r}")
        self.comm: Comm = resolve_comm(process_group)
        self.rank, self.world_size = self.comm.rank, self.comm.world
        self.sample_rate = float(sample_rate)
        self.label_smoothing, self.reduction, self.ignore_index = (
            float(label_smoothing), reduction, ignore_index)
        self.backend, self.generator, self.track_stats = backend, generator, bool(track_stats)
        self.embedding_grad_scale = (float(self.world_size) if embedding_grad_scale is None
                                     else float(embedding_grad_scale))
        self.class_start, self.num_local = shard_range(num_classes, self.world_size,
                                                       self.rank)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight = nn.Parameter(torch.empty(self.num_local * sub_centers, embedding_size,
                                               device=device, dtype=dtype))
        self.weight_index: Optional[Tensor] = None
        self.last_stats: Optional[LossStats] = None
        self.reset_parameters()

    @classmethod
    def from_insightface(cls, margin_loss, embedding_size: int, num_classes: int,
                         sample_rate: float = 1.0, fp16: bool = False,
                         **kwargs) -> "PartialFC":
        """insightface's ``PartialFC_V2(margin_loss, embedding_size, num_classes,
        sample_rate, fp16)``, positional arguments included: ``margin_loss`` is a
        ``CombinedMarginLoss`` or any object with its attributes s, m1, m2, m3,
        interclass_filtering_threshold (insightface need not be installed). The head
        then computes insightface's loss and gradients (see
        :mod:`arcface_kernels.compat.insightface`); ``kwargs`` go to the constructor
        (process_group, generator, backend, device, ...)."""
        from .compat.insightface import settings
        return cls(embedding_size, num_classes, sample_rate,
                   **{**settings(margin_loss), "fp16": fp16, **kwargs})

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    # ---------------------------------------------------------------- input checks
    def _check_local(self, x, labels) -> Optional[Exception]:
        """This rank's own input errors (no communication); None when fine."""
        k = self.cfg.sub_centers
        try:
            if isinstance(x, Tensor) and x.dim() == 2 and x.shape[1] != self.embedding_size:
                raise ValueError(f"local_embeddings must have shape [N, "
                                 f"{self.embedding_size}] (embedding_size), got "
                                 f"{tuple(x.shape)}")
            check_loss_inputs(
                x, self.weight, labels, k, names=("local_embeddings", "weight",
                                                  "local_labels"),
                weight_dtype="any_float", weight_rows=self.num_local * k, min_rows=1,
                weight_rows_note=f"rank {self.rank} of {self.world_size} owns "
                                 f"{self.num_local} of {self.num_classes} classes x "
                                 f"sub_centers={k}")
        except (TypeError, ValueError) as e:
            return e
        return None

    def _check_group(self, x, labels, err: Optional[Exception]) -> None:
        """Every rank raises when any rank's inputs are bad or the ranks disagree (batch
        size, dtype, sharding configuration): one small all-gather, no hang."""
        comm = self.comm
        if not comm.distributed:
            if err is not None:
                raise err
            return
        ok = err is None
        meta = [0 if ok else 1,
                x.shape[0] if ok else -1, _FLOAT_CODES[x.dtype] if ok else -1,
                int(x.requires_grad) if ok else -1,
                self.num_classes, self.embedding_size, self.cfg.sub_centers,
                self.ignore_index, round(self.sample_rate * 1e9), self.world_size]
        metas = gather_ints(torch.tensor([meta], dtype=torch.long, device=self.weight.device),
                            comm).tolist()
        bad = [r for r, m in enumerate(metas) if m[0]]
        if bad:
            msgs = gather_objects(None if ok else f"{type(err).__name__}: {err}", comm)
            text = "; ".join(f"rank {r}: {msgs[r]}" for r in bad)
            exc = type(err) if err is not None else ValueError
            raise exc(f"PartialFC: invalid input on rank(s) {bad} (raised on every "
                      f"rank): {text}")
        names = ["local batch size N", "local_embeddings dtype",
                 "local_embeddings.requires_grad", "num_classes", "embedding_size",
                 "sub_centers", "ignore_index", "sample_rate", "world size"]
        for i, name in enumerate(names, start=1):
            vals = [m[i] for m in metas]
            if len(set(vals)) > 1:
                if name == "local_embeddings dtype":
                    inv = {v: k for k, v in _FLOAT_CODES.items()}
                    vals = [str(inv[v]) for v in vals]
                elif name == "sample_rate":
                    vals = [v / 1e9 for v in vals]
                what = ("the class sharding differs across ranks (weight shapes would not "
                        "match): " if name in ("num_classes", "embedding_size", "sub_centers",
                                               "world size") else "")
                raise ValueError(f"PartialFC: {what}{name} must be the same on every rank, "
                                 f"got {vals} (by rank)")

    def _map_labels(self, labels_all: Tensor, n: int) -> Tensor:
        try:
            return local_labels(labels_all, self.class_start, self.num_local,
                                self.num_classes, self.ignore_index)
        except ValueError as e:
            ign = labels_all == self.ignore_index
            bad = ~ign & ((labels_all < 0) | (labels_all >= self.num_classes))
            pos = torch.nonzero(bad).flatten().tolist()
            ranks = sorted({p // n for p in pos})
            raise ValueError(f"PartialFC: local_labels of rank(s) {ranks} out of range: {e}"
                             ) from None

    # ---------------------------------------------------------------- sampling
    def sample(self, shard_labels: Tensor):
        """Partial FC sampling on this shard.

        shard_labels [W*N]: shard positions of the global batch's targets (-1 elsewhere).
        Returns (index [num_sample'] int64 sorted shard positions, labels [W*N] remapped to
        positions in index, -1 elsewhere). The positives are always kept; negatives are
        drawn uniformly without replacement up to ``num_sample`` classes in all.
        """
        with torch.no_grad():
            has = shard_labels >= 0
            positive = torch.unique(shard_labels[has], sorted=True)
            if self.num_sample >= positive.numel():
                perm = torch.rand(self.num_local, generator=self.generator,
                                  device=shard_labels.device)
                perm[positive] = 2.0
                index = torch.topk(perm, k=self.num_sample)[1].sort()[0]
            else:
                index = positive
            mapped = torch.searchsorted(index, shard_labels.clamp(min=0))
            labels = torch.where(has, mapped, torch.full_like(shard_labels, -1))
        return index, labels

    # ---------------------------------------------------------------- forward
    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        """local_embeddings [N, D], local_labels [N] or [N, 1] int64 -> loss (see class)."""
        if isinstance(local_labels, Tensor) and local_labels.dim() == 2 \
                and local_labels.shape[1] == 1:
            local_labels = local_labels.reshape(-1)
        err = self._check_local(local_embeddings, local_labels)
        self._check_group(local_embeddings, local_labels, err)
        local_labels = local_labels.long()   # any integer dtype (insightface: .long())
        comm, cfg = self.comm, self.cfg
        x, n = local_embeddings, local_embeddings.shape[0]
        labels_all = gather_ints(local_labels, comm)
        x_all = gather_rows(x, comm, self.embedding_grad_scale)
        shard_labels = self._map_labels(labels_all, n)

        sampling = self.sample_rate < 1.0
        index = None
        if sampling:
            index, shard_labels = self.sample(shard_labels)
            self.weight_index = index
        shard_size = index.numel() if sampling else self.num_local
        dtype = torch.float16 if self.fp16 else x.dtype
        x_all = x_all.to(dtype)
        w, w_index = self.weight, index
        if w.dtype != dtype:
            if sampling:   # cast the rows in this step's softmax only, not the shard
                k = cfg.sub_centers
                rows = (index.unsqueeze(1) * k + torch.arange(k, device=index.device))
                w, w_index = w.index_select(0, rows.reshape(-1)).to(dtype), None
            else:
                w = w.to(dtype)
        acc = acc_dtype(dtype)
        if shard_size > 0:
            be = resolve_backend(self.backend, x.device)
            with autocast_off(x.device):
                lse_r, tgt_r, sumz_r, maxz_r, arg_r = be.fwd(
                    x_all, w, shard_labels, w_index, None, *cfg.op_args(),
                    self.grad_filter, self.block)
        else:  # an empty shard: no classes here, but stay in the graph on every rank
            zero = (x_all[:0].sum() + w[:0].sum()).to(acc)
            lse_r = torch.full((x_all.shape[0],), -math.inf, dtype=acc,
                               device=x.device) + zero
            tgt_r, sumz_r = torch.zeros_like(lse_r) + zero, torch.zeros_like(lse_r) + zero
            maxz_r = torch.full_like(lse_r, -math.inf)
            arg_r = torch.zeros(x_all.shape[0], dtype=torch.long, device=x.device)

        smoothing = self.label_smoothing != 0.0
        rows = [lse_r, tgt_r] + ([sumz_r] if smoothing else []) \
            + ([maxz_r.detach()] if self.track_stats else [])
        full = gather_live(torch.stack(rows), comm)       # [W, k, W*N]
        lse = torch.logsumexp(full[:, 0], dim=0)
        target = full[:, 1].sum(dim=0)
        sum_z = full[:, 2].sum(dim=0) if smoothing else None
        num_softmax = self.num_classes
        if smoothing and sampling:
            counts = gather_ints(torch.tensor([shard_size], device=x.device), comm)
            num_softmax = int(counts.sum())
        loss_rows = floor_probability(
            combine_loss_rows(lse, target, sum_z, self.label_smoothing, num_softmax),
            self.prob_floor)
        valid = labels_all != self.ignore_index
        loss = reduce_rows(loss_rows, valid, self.reduction)
        if self.track_stats:
            cls = index[arg_r] if (sampling and shard_size > 0) else arg_r
            ids = gather_ints((cls + self.class_start).unsqueeze(0), comm)  # [W, W*N]
            best = full[:, -1].detach().argmax(dim=0)
            pred = ids.gather(0, best.unsqueeze(0)).squeeze(0)
            self.last_stats = LossStats(lse.detach(), target.detach(),
                                        full[:, -1].detach().amax(dim=0), pred)
        return loss

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"rank={self.rank}/{self.world_size}, class_start={self.class_start}, "
                f"num_local={self.num_local}, sample_rate={self.sample_rate}, s={c.s}, "
                f"m1={c.m1}, m2={c.m2}, m3={c.m3}, sub_centers={c.sub_centers}, "
                f"backend={self.backend!r}")
