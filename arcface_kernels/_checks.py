"""Input validation: the one place the Python side checks tensors (ValueError/TypeError
naming the argument and its value).

* :func:`check_loss_inputs` - the public entry points: ``arcface_loss``, ``ArcFaceLoss``,
  ``ArcFaceFunction`` and ``PartialFC`` (per rank). What differs between them is a
  parameter, not a copy: the argument names, whether weight may have another dtype than
  the embeddings (PartialFC keeps float32 weights under float16 training), the weight
  shape a shard must have, and the fewest rows.
* :func:`check_op_args` - direct calls of a Python backend's ops (reference, chunked,
  triton), whose arguments are shard positions: the same tensor rules, plus the values of
  ``labels`` ([-1, shard size)) and ``index`` ([0, classes of w)). On CUDA the value
  checks are device-side asserts (no host sync); during a trace they are skipped.

The C++ ops check their arguments in csrc/ops.cpp (the same rules, TORCH_CHECK).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT32_MAX = 2 ** 31 - 1


def check_loss_inputs(embeddings: Tensor, weight: Tensor, labels: Tensor, sub_centers: int,
                      *, names: Tuple[str, str, str] = ("embeddings", "weight", "labels"),
                      weight_dtype: str = "same", weight_rows: Optional[int] = None,
                      weight_rows_note: str = "", min_rows: int = 0,
                      labels_dtype: str = "any_int") -> None:
    """Shape / dtype / device checks of a loss call.

    names: how the caller calls (embeddings, weight, labels). weight_dtype: "same"
    (weight must have the embeddings' dtype) or "any_float" (any floating dtype; the caller
    casts). weight_rows: the exact number of rows weight must have (a shard), with
    ``weight_rows_note`` saying why; else any positive multiple of sub_centers.
    min_rows: the fewest rows the embeddings may have. labels_dtype: "any_int" (any
    integer dtype; the caller casts to int64) or "int64".
    """
    en, wn, ln = names
    for name, t in ((en, embeddings), (wn, weight), (ln, labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"{en} must be 2-D [N, D], got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{wn} must be 2-D [C, D], got shape {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"{ln} must be 1-D [N], got shape {tuple(labels.shape)}")
    if embeddings.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{en} must be float16/bfloat16/float32/float64, "
                        f"got {embeddings.dtype}")
    if weight_dtype == "same":
        if weight.dtype != embeddings.dtype:
            raise TypeError(f"{wn} dtype must match {en} dtype {embeddings.dtype}, "
                            f"got {weight.dtype}")
    elif weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{wn} must be float16/bfloat16/float32/float64, got {weight.dtype}")
    if labels.dtype != torch.int64 and (labels_dtype == "int64" or labels.is_floating_point()
                                        or labels.is_complex() or labels.dtype == torch.bool):
        raise TypeError(f"{ln} must be int64 (torch.long), got {labels.dtype}"
                        if labels_dtype == "int64" else
                        f"{ln} must be an integer tensor (class ids), got {labels.dtype}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{ln} has {labels.shape[0]} rows but {en} has "
                         f"{embeddings.shape[0]} (N must match)")
    if embeddings.shape[0] < min_rows:
        raise ValueError(f"{en} must have at least {min_rows} row(s), "
                         f"got N={embeddings.shape[0]}")
    if embeddings.shape[1] == 0:
        raise ValueError(f"{en} must have D >= 1, got D=0")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"{wn} has D={weight.shape[1]} but {en} has "
                         f"D={embeddings.shape[1]} (D must match)")
    if weight_rows is not None:
        if weight.shape[0] != weight_rows:
            raise ValueError(f"{wn} has shape {tuple(weight.shape)} but {weight_rows_note}: "
                             f"expected ({weight_rows}, {embeddings.shape[1]})")
    else:
        if weight.shape[0] == 0:
            raise ValueError(f"{wn} must have at least one class, got 0 rows")
        if weight.shape[0] % sub_centers:
            raise ValueError(f"{wn} has {weight.shape[0]} rows, not a multiple of "
                             f"sub_centers={sub_centers}")
    if not (embeddings.device == weight.device == labels.device):
        raise ValueError(f"{en}, {wn} and {ln} must be on one device, got "
                         f"{embeddings.device}, {weight.device}, {labels.device}")


def _traced(tensors: Sequence[Tensor]) -> bool:
    """Stand-ins of a trace (fake / functional tensors, or Dynamo): no data to read."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)


def _check_range(t: Tensor, lo: int, hi: int, what: str, note: str) -> None:
    """Every value of ``t`` in [lo, hi): a device-side assert on CUDA, else an error with
    the values found."""
    if t.numel() == 0 or _traced([t]):
        return
    if t.is_cuda:
        torch._assert_async(((t >= lo) & (t < hi)).all(),
                            f"{what} must be in [{lo}, {hi}) ({note})")
        return
    tmin, tmax = torch.stack(torch.aminmax(t)).tolist()
    if tmin < lo or tmax >= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}) ({note}), got values in "
                         f"[{tmin}, {tmax}]")


def check_bias(bias: Optional[Tensor], weight: Tensor, sub_centers: int,
               name: str = "bias", weight_name: str = "weight", pre: str = "") -> None:
    """bias: None or [C] (one value per class of ``weight``: its rows / sub_centers), in
    weight's dtype and on its device."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{pre}{name} must be None or a torch.Tensor, got "
                        f"{type(bias).__name__}")
    classes = weight.shape[0] // sub_centers
    if bias.dim() != 1 or bias.shape[0] != classes:
        raise ValueError(f"{pre}{name} must have shape [{classes}] (one value per class of "
                         f"{weight_name}), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{pre}{name} dtype must match {weight_name} dtype {weight.dtype}, "
                        f"got {bias.dtype}")
    if bias.device != weight.device:
        raise ValueError(f"{pre}{name} must be on {weight_name}'s device {weight.device}, "
                         f"got {bias.device}")


def check_op_args(backend: str, x: Tensor, w: Tensor, labels: Tensor,
                  index: Optional[Tensor], sub_centers: int,
                  row_vectors: Sequence[Tuple[str, Tensor]] = (),
                  bias: Optional[Tensor] = None) -> None:
    """Checks of a direct call of backend ``backend``'s fwd / bwd op (module docstring).
    row_vectors: the backward's (name, [N] floating tensor) pairs lse, g_p, g_t, g_s;
    bias: the op's bias ([R / K] in w's dtype, or None)."""
    pre = f"{backend} backend: "
    if isinstance(sub_centers, bool) or not isinstance(sub_centers, int) or sub_centers < 1:
        raise ValueError(f"{pre}sub_centers must be an int >= 1, got {sub_centers!r}")
    if not (isinstance(w, Tensor) and w.dim() == 2):
        raise ValueError(f"{pre}w must be a 2-D tensor [C*K, D], got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if w.shape[0] % sub_centers:
        raise ValueError(f"{pre}w has {w.shape[0]} rows, not a multiple of "
                         f"sub_centers={sub_centers}")
    try:
        check_loss_inputs(x, w, labels, sub_centers, names=("x", "w", "labels"),
                          weight_rows=w.shape[0], labels_dtype="int64")
    except (TypeError, ValueError) as e:
        raise type(e)(pre + str(e)) from None
    check_bias(bias, w, sub_centers, "bias", "w", pre)
    devs = {x.device, w.device, labels.device}
    num_w = w.shape[0] // sub_centers
    shard = num_w
    if index is not None:
        if not isinstance(index, Tensor) or index.dtype != torch.int64:
            raise TypeError(f"{pre}index must be int64, got "
                            f"{getattr(index, 'dtype', type(index).__name__)}")
        if index.dim() != 1:
            raise ValueError(f"{pre}index must be 1-D, got shape {tuple(index.shape)}")
        devs.add(index.device)
        shard = index.shape[0]
        _check_range(index, 0, num_w, f"{pre}index values", "classes of w")
    if shard * sub_centers > INT32_MAX:
        raise ValueError(f"{pre}the shard has {shard * sub_centers} rows of w (classes x "
                         f"sub_centers); at most {INT32_MAX} are supported")
    for name, t in row_vectors:
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"{pre}{name} must have shape [{x.shape[0]}], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else t!r}")
        if not t.is_floating_point():
            raise TypeError(f"{pre}{name} must be floating, got {t.dtype}")
        devs.add(t.device)
    if len(devs) != 1:
        raise ValueError(f"{pre}all tensors must be on one device, got {sorted(map(str, devs))}")
    _check_range(labels, -1, shard, f"{pre}labels", "positions in the shard, -1 = no target")
