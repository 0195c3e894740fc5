"""The "triton" backend: the ops ``arcface_kernels::triton_fwd`` / ``triton_bwd``.

The kernels and their launchers are the leaf package ``arcface_kernels.triton_kernels``
(source folder ``triton_kernels/``, which imports only torch and triton). Here they are
registered with ``torch.library.triton_op`` (so torch.compile traces through the
launches with fullgraph=True), with exactly the schemas of ``arcface_kernels._ops``, the
scalar checks of :class:`MarginConfig`, and the shared autograd formula. The fake kernels
come from triton_op's own tracing of the launchers
(``register_autograd_and_fake(..., with_fake=False)``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.library import triton_op

from ._checks import check_op_args
from ._config import MarginConfig, check_grad_filter
from ._ops import NAMESPACE, register_autograd_and_fake
from .triton_kernels import launch

FWD_NAME = f"{NAMESPACE}::triton_fwd"
BWD_NAME = f"{NAMESPACE}::triton_bwd"


@triton_op(FWD_NAME, mutates_args=())
def triton_fwd(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor],
               bias: Optional[Tensor], s: float, m1: float, m2: float, m3: float,
               wrap_mode: int, grad_mode: int, normalize: bool, sub_centers: int,
               softcap: float, interclass: float, grad_filter: float, block: int
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward primitive (see ``arcface_kernels._ops``); ``grad_filter`` and ``block``
    are ignored."""
    MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers,
                              softcap, interclass)
    check_op_args("triton", x, w, labels, index, sub_centers, bias=bias)
    return launch.forward(x, w, labels, index, bias, s, m1, m2, m3, wrap_mode, grad_mode,
                          normalize, sub_centers, softcap, interclass)


@triton_op(BWD_NAME, mutates_args=())
def triton_bwd(x: Tensor, w: Tensor, labels: Tensor, index: Optional[Tensor],
               bias: Optional[Tensor], lse: Tensor, g_p: Tensor, g_t: Tensor, g_s: Tensor,
               s: float, m1: float, m2: float, m3: float, wrap_mode: int, grad_mode: int,
               normalize: bool, sub_centers: int, softcap: float, interclass: float,
               grad_filter: float, block: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward primitive (see ``arcface_kernels._ops``): (dx, dw, dbias; dbias is an
    empty tensor without bias); ``grad_filter``: skip gradient tiles whose softmax values
    are all below it (0: exact); ``block``: classes per backward chunk (0: as many as
    the workspace holds)."""
    MarginConfig.from_op_args(s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers,
                              softcap, interclass)
    check_grad_filter(grad_filter)
    check_op_args("triton", x, w, labels, index, sub_centers,
                  (("lse", lse), ("g_p", g_p), ("g_t", g_t), ("g_s", g_s)), bias=bias)
    return launch.backward(x, w, labels, index, bias, lse, g_p, g_t, g_s, s, m1, m2, m3,
                           wrap_mode, grad_mode, normalize, sub_centers, softcap,
                           interclass, block, grad_filter=grad_filter)


FWD_OP = torch.ops.arcface_kernels.triton_fwd.default
BWD_OP = torch.ops.arcface_kernels.triton_bwd.default
register_autograd_and_fake(FWD_NAME, BWD_NAME, FWD_OP, BWD_OP, with_fake=False)
