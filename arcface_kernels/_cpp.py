"""The "cpp" backend: ops of the compiled extension ``arcface_kernels._C`` (csrc/).

Importing this module imports the extension (ImportError when it was not built, which
:mod:`arcface_kernels.backends` reports as "unavailable") and attaches the shared fake
kernels and autograd formula to its ops ``arcface_kernels::cpp_fwd`` / ``cpp_bwd``
(schemas as :data:`arcface_kernels._ops.FWD_SCHEMA` / ``BWD_SCHEMA``).

FWD_OP(x [N, D], w [C*K, D], labels [N], index [C]?, bias [C]?, s, m1, m2, m3,
wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass, grad_filter, block)
-> (lse, target, sum_z, max_z [N] float32 or float64, argmax [N] int64);
BWD_OP(x, w, labels, index, bias, lse, g_p, g_t, g_s [N], <the same scalars>)
-> (dx [N, D], dw [C*K, D], dbias [C] in bias's dtype, or an empty [0] tensor of x's
dtype without a bias). bias holds one value per class of w (not per shard position);
softcap and interclass are 0.0 when off. CPU tensors: float64/float32/float16/bfloat16;
CUDA tensors (when :data:`DEVICES` has "cuda"): float32/float16/bfloat16.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the ops; ImportError when not built)
from ._ops import NAMESPACE, register_autograd_and_fake

WITH_CUDA = bool(_C.WITH_CUDA)
DEVICES = ("cpu", "cuda") if WITH_CUDA else ("cpu",)

FWD_NAME = f"{NAMESPACE}::cpp_fwd"
BWD_NAME = f"{NAMESPACE}::cpp_bwd"
FWD_OP = torch.ops.arcface_kernels.cpp_fwd.default
BWD_OP = torch.ops.arcface_kernels.cpp_bwd.default

register_autograd_and_fake(FWD_NAME, BWD_NAME, FWD_OP, BWD_OP)
