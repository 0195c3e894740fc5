"""The forward/backward primitive as torch.library ops, and their autograd.

Every backend supplies two ops with the schemas below, named
``arcface_kernels::<backend>_fwd`` and ``arcface_kernels::<backend>_bwd``:

  fwd(x [N, D], w [R, D], labels [N] int64, index [C]? int64, bias [R / K]?,
      s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass,
      grad_filter, block)
      -> (lse [N], target [N], sum_z [N], max_z [N], argmax [N] int64)

  bwd(x, w, labels, index, bias, lse [N], g_p [N], g_t [N], g_s [N], <the same scalars>)
      -> (dx [N, D], dw [R, D], dbias [R / K], or [0] without bias)

* The shard's classes are ``index`` (class ids into w's C = R / K classes) or, when index
  is None, all C classes of w. Class j owns rows j*K .. j*K+K-1 of w (K = sub_centers).
* ``labels`` holds each row's target as a position in the shard's class list, or -1
  when the row has no target in this shard (ignored, or the target lives elsewhere).
* The logit of row i at shard position j (class id g), from its cosine c (docs/design.md
  sections 1 and 3): u = 0 where the interclass filter drops it (non-target, c >
  interclass > 0), psi(c) at the target, c elsewhere; v = s u + bias[g];
  z = softcap tanh(v / softcap) (softcap > 0) or v.
* lse, target, sum_z, max_z are float64 for float64 inputs and float32 otherwise:
  lse = log sum_j exp(z_ij); target = z_i,label (0 without); sum_z = sum_j z_ij;
  max_z = the capped max_j (s c_ij + bias[g]) (no margin, no filter; for accuracy) at
  class argmax.
* The backward computes dL/dz_ij = g_p_i exp(z_ij - lse_i) + g_t_i [j = label_i] + g_s_i
  and returns dx, dw in the input dtypes (rows of w outside the shard get zero) and
  dbias in bias's dtype (an empty tensor without bias).
* ``block`` is a backend tuning hint (class chunk size for chunked); 0 = default.
* ``grad_filter`` (eps >= 0; the forward ignores it): the backward may treat softmax
  values p_ij < eps of non-target classes as 0 (Cut Cross-Entropy's gradient filter);
  0 = the exact gradient. A backend without a filter raises NotImplementedError for
  eps > 0.

Because the backward takes the three per-row coefficients, autograd registered on the
fwd op (below, once for all backends) covers any loss built from lse, target and sum_z
with ordinary torch ops: the single-device loss, label smoothing, a z-loss, and the
sharded loss whose cross-rank logsumexp lives in torch.distributed.nn. That backward is
not itself differentiable: a gradient taken with create_graph=True is right, but
differentiating it again raises (``DOUBLE_BACKWARD_ERROR``). arcface_loss, PartialFC and
this backward call the ops with autocast off (:func:`autocast_off`), so a loss inside a
torch.autocast region computes exactly what it computes outside one.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

NAMESPACE = "arcface_kernels"

FWD_SCHEMA = (
    "(Tensor x, Tensor w, Tensor labels, Tensor? index, Tensor? bias, float s, float m1, "
    "float m2, float m3, int wrap_mode, int grad_mode, bool normalize, int sub_centers, "
    "float softcap, float interclass, float grad_filter, int block)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor x, Tensor w, Tensor labels, Tensor? index, Tensor? bias, Tensor lse, "
    "Tensor g_p, Tensor g_t, Tensor g_s, float s, float m1, float m2, float m3, "
    "int wrap_mode, int grad_mode, bool normalize, int sub_centers, float softcap, "
    "float interclass, float grad_filter, int block) -> (Tensor, Tensor, Tensor)"
)
# s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass,
# grad_filter, block
NUM_SCALARS = 12


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_off(device: torch.device):
    """Context in which autocast is off for ``device``: the ops compute in the dtypes
    they are given (float32 statistics for half inputs). Without it, a call under
    torch.autocast would run the Python backends' inner matmuls in half precision even
    for float32 inputs, and their backward would mix dtypes."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def fwd_fake(x, w, labels, index, bias, *scalars):
    n = x.shape[0]
    acc = acc_dtype(x.dtype)
    return (x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc),
            x.new_empty(n, dtype=acc), x.new_empty(n, dtype=torch.long))


def empty_dbias(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The backward's dbias output when there is no bias: an empty tensor; else a new
    (uninitialized) tensor like bias."""
    if bias is None:
        return x.new_empty(0)
    return torch.empty_like(bias, memory_format=torch.contiguous_format)


def bwd_fake(x, w, labels, index, bias, lse, g_p, g_t, g_s, *scalars):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(w, memory_format=torch.contiguous_format), empty_dbias(x, bias)


def _setup_context(ctx, inputs, output):
    x, w, labels, index, bias = inputs[:5]
    ctx.save_for_backward(x, w, labels, index, bias, output[0])
    ctx.scalars = tuple(inputs[5:])


DOUBLE_BACKWARD_ERROR = (
    "arcface_kernels: the gradient of the loss is not differentiable (double backward, "
    "i.e. differentiating a gradient obtained with create_graph=True through "
    "arcface_loss / ArcFaceLoss / PartialFC, is not supported)")


def _not_differentiable(grads, sources):
    """``grads`` as tensors whose backward raises DOUBLE_BACKWARD_ERROR on the way to
    any of ``sources`` (the tensors they depend on: x, w, the incoming gradients).

    What torch.autograd.function.once_differentiable does, except that it links the
    error to the incoming gradients only; here it is linked to x and w too, so that
    torch.autograd.grad(dx, w) raises instead of reporting w as unused."""
    live = [g for g in grads if g is not None]
    deps = [t for t in sources if t is not None and t.requires_grad]
    err = torch._C._functions.DelayedError(DOUBLE_BACKWARD_ERROR.encode(),
                                           len(live) + len(deps))
    out = iter(err(*live, *deps)[:len(live)])
    return tuple(None if g is None else next(out) for g in grads)


def primitive_backward(bwd_op: Callable, x: Tensor, w: Tensor, labels: Tensor,
                       index: Optional[Tensor], bias: Optional[Tensor], lse: Tensor,
                       scalars: tuple, g_lse: Optional[Tensor], g_tgt: Optional[Tensor],
                       g_sum: Optional[Tensor], need_dx: bool, need_dw: bool,
                       need_db: bool = False
                       ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dw, dbias) from the incoming gradients of the forward's lse, target and sum_z
    (None: zero): the one backward of every backend, behind both the ops' registered
    autograd and :class:`arcface_kernels.ArcFaceFunction`."""
    if not (need_dx or need_dw or need_db):
        return None, None, None
    coeffs = []
    for g in (g_lse, g_tgt, g_sum):
        coeffs.append(torch.zeros_like(lse) if g is None else g.to(lse.dtype).contiguous())
    # create_graph=True runs this under grad mode: the ops' backward has no derivative
    # of its own, so compute it without recording a graph and make any attempt to
    # differentiate its result raise, instead of returning a silently wrong (zero or
    # partial) second derivative.
    sources = (x, w, bias, g_lse, g_tgt, g_sum)
    create_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in sources)
    with torch.no_grad(), autocast_off(x.device):
        dx, dw, db = bwd_op(x, w, labels, index, bias, lse, *coeffs, *scalars)
    grads = (dx if need_dx else None), (dw if need_dw else None), \
        (db if need_db and bias is not None else None)
    if create_graph:
        grads = _not_differentiable(grads, sources)
    return grads


def _make_backward(bwd_op: Callable) -> Callable:
    def backward(ctx, g_lse, g_tgt, g_sum, _g_max, _g_arg):
        x, w, labels, index, bias, lse = ctx.saved_tensors
        dx, dw, db = primitive_backward(bwd_op, x, w, labels, index, bias, lse, ctx.scalars,
                                        g_lse, g_tgt, g_sum, ctx.needs_input_grad[0],
                                        ctx.needs_input_grad[1], ctx.needs_input_grad[4])
        return (dx, dw, None, None, db) + (None,) * NUM_SCALARS
    return backward


def register_autograd_and_fake(fwd_name: str, bwd_name: str, fwd_op: Callable,
                               bwd_op: Callable, with_fake: bool = True) -> None:
    """Attach the shared fake (meta) kernels and autograd formula to a backend's ops."""
    if with_fake:
        torch.library.register_fake(fwd_name)(fwd_fake)
        torch.library.register_fake(bwd_name)(bwd_fake)
    torch.library.register_autograd(fwd_name, _make_backward(bwd_op),
                                    setup_context=_setup_context)


_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def define_python_backend(name: str, fwd_impl: Callable, bwd_impl: Callable
                          ) -> Tuple[Callable, Callable]:
    """Define ``<name>_fwd`` / ``<name>_bwd`` ops backed by Python functions that run on
    any device (CompositeExplicitAutograd), with the shared fake and autograd."""
    fwd_name, bwd_name = f"{NAMESPACE}::{name}_fwd", f"{NAMESPACE}::{name}_bwd"
    _LIB.define(f"{name}_fwd{FWD_SCHEMA}")
    _LIB.define(f"{name}_bwd{BWD_SCHEMA}")
    _LIB.impl(f"{name}_fwd", fwd_impl, "CompositeExplicitAutograd")
    _LIB.impl(f"{name}_bwd", bwd_impl, "CompositeExplicitAutograd")
    ns = getattr(torch.ops, NAMESPACE)
    fwd_op, bwd_op = getattr(ns, f"{name}_fwd").default, getattr(ns, f"{name}_bwd").default
    register_autograd_and_fake(fwd_name, bwd_name, fwd_op, bwd_op)
    return fwd_op, bwd_op


# ---------------------------------------------------------------------------------------
# Label mapping: global labels -> positions in a shard, with the value checks. An op of
# its own so that the checks run at run time also under torch.compile.
# ---------------------------------------------------------------------------------------
_LIB.define("local_labels(Tensor labels, int class_start, int num_local, int num_classes, "
            "int ignore_index) -> Tensor")


def _local_labels_impl(labels: Tensor, class_start: int, num_local: int, num_classes: int,
                       ignore_index: int) -> Tensor:
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= num_classes))
    if labels.is_cuda:
        # no host sync on the GPU (a training step must be capturable in a CUDA graph):
        # a device-side assert, which stops the process with this message
        torch._assert_async(torch.logical_not(bad.any()),
                            f"labels must be in [0, {num_classes}) or equal "
                            f"ignore_index={ignore_index}")
    elif bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"got {first} ({int(bad.sum())} bad label(s))")
    local = labels - class_start
    inside = ~ignored & (local >= 0) & (local < num_local)
    return torch.where(inside, local, torch.full_like(local, -1))


_LIB.impl("local_labels", _local_labels_impl, "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::local_labels")
def _local_labels_fake(labels, class_start, num_local, num_classes, ignore_index):
    return torch.empty_like(labels)


def local_labels(labels: Tensor, class_start: int, num_local: int, num_classes: int,
                 ignore_index: int) -> Tensor:
    """Map global labels [N] to shard positions (-1: no target here); checks the range."""
    return torch.ops.arcface_kernels.local_labels.default(
        labels, class_start, num_local, num_classes, ignore_index)

