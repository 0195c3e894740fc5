"""Loss configuration: the scalar knobs every backend receives, validated once.

The knobs travel to the ops as plain scalars (see ``_ops.py`` for the schema). This
module owns their names, their integer codes and the checks on their values, so the
functional API, the modules and the sharded path all reject bad values the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


# Integer codes shared with the Triton module and the C++ header (keep in sync:
# tests/test_cpp.py and tests/test_triton.py check the C++ and Triton constants).
# The backends' names (the registry is backends.py; named here so that the settings, and
# the reference that imports them, import no backend).
ALL_BACKENDS = ("reference", "chunked", "triton", "cpp")

# The workspace bound, in bytes, of every chunking backend (docs/design.md section 4,
# "Workspace bounds"): with chunk_size=None a backend picks its chunk of classes so that
# its temporaries stay within it. chunked: one [N, chunk*K] temporary in the accumulation
# dtype; triton: the backward's gradient workspace (ARCFACE_TRITON_WORKSPACE_MB overrides
# it); cpp: the C++ kernels' buffers (csrc/ops.h kWorkspaceBytes). A test checks that
# every backend uses this value. The reference materializes N x C and has no bound.
WORKSPACE_BYTES = 16 << 20

WRAP_MODES = {"fallback": 0, "easy": 1, "none": 2}
GRAD_MODES = {"exact": 0, "straight_through": 1}
REDUCTIONS = ("mean", "sum", "none")
_WRAP_NAMES = {v: k for k, v in WRAP_MODES.items()}
_GRAD_NAMES = {v: k for k, v in GRAD_MODES.items()}


@dataclass(frozen=True)
class MarginConfig:
    """The math of one loss, as in arcface_kernels/reference.py.

    Attributes:
        s: logit scale (> 0).
        m1: multiplicative angular margin (SphereFace), > 0.
        m2: additive angular margin (ArcFace), in [0, pi).
        m3: additive cosine margin (CosFace).
        margin_mode: what happens where m1*theta + m2 passes pi: "fallback"
            (psi = c - m2 sin m2 - m3, ArcFace paper / insightface default), "easy"
            (insightface easy_margin: psi = c - m3 where c <= 0) or "none" (formula as is).
        target_grad: "exact" (d psi / dc) or "straight_through" (d psi / dc = 1, what
            insightface's current code computes).
        normalize: normalize embeddings and class centres (cosine logits). With
            normalize=False the logits are s * <x, w>; angular margins (m1 != 1, m2 != 0)
            then have no meaning and are rejected.
        sub_centers: K >= 1 sub-centers per class (weight has C*K rows).
        softcap: None, or a cap > 0: each logit z becomes softcap * tanh(z / softcap)
            (Gemma 2's logit soft-capping), after the margin and the bias.
        interclass_filtering_threshold: 0 (off), or t > 0: a non-target cosine above t
            counts as 0, in value and gradient (insightface's option of that name).
    """

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    margin_mode: str = "fallback"
    target_grad: str = "exact"
    normalize: bool = True
    sub_centers: int = 1
    softcap: Optional[float] = None
    interclass_filtering_threshold: float = 0.0

    def __post_init__(self) -> None:
        for name in ("s", "m1", "m2", "m3"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a real number, got {v!r}")
            # a comparison, not math.isfinite: under torch.compile(dynamic=True) a float
            # argument arrives as a symbolic float, which math.isfinite does not take
            if not -math.inf < v < math.inf:  # False for nan and +-inf
                raise ValueError(f"{name} must be finite, got {v!r}")
        if not self.s > 0:
            raise ValueError(f"s must be > 0, got {self.s!r}")
        if not self.m1 > 0:
            raise ValueError(f"m1 must be > 0, got {self.m1!r}")
        if not 0.0 <= self.m2 < math.pi:
            raise ValueError(f"m2 must be in [0, pi), got {self.m2!r}")
        if self.margin_mode not in WRAP_MODES:
            raise ValueError(
                f"margin_mode must be one of {sorted(WRAP_MODES)}, got {self.margin_mode!r}")
        if self.target_grad not in GRAD_MODES:
            raise ValueError(
                f"target_grad must be one of {sorted(GRAD_MODES)}, got {self.target_grad!r}")
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {self.normalize!r}")
        if not self.normalize and (self.m1 != 1.0 or self.m2 != 0.0):
            raise ValueError(
                "normalize=False gives unbounded logits on which angular margins are "
                f"undefined: m1 must be 1 and m2 must be 0, got m1={self.m1!r}, m2={self.m2!r}")
        if isinstance(self.sub_centers, bool) or not isinstance(self.sub_centers, int):
            raise TypeError(f"sub_centers must be an int, got {self.sub_centers!r}")
        if self.sub_centers < 1:
            raise ValueError(f"sub_centers must be >= 1, got {self.sub_centers!r}")
        cap = self.softcap
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, (int, float)):
                raise TypeError(f"softcap must be None or a real number, got {cap!r}")
            if not 0 < cap < math.inf:
                raise ValueError(f"softcap must be None or finite and > 0, got {cap!r}")
        t = self.interclass_filtering_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"interclass_filtering_threshold must be a real number, got {t!r}")
        if not 0 <= t < math.inf:
            raise ValueError(f"interclass_filtering_threshold must be finite and >= 0 "
                             f"(0 = off), got {t!r}")

    @property
    def wrap_code(self) -> int:
        return WRAP_MODES[self.margin_mode]

    @property
    def grad_code(self) -> int:
        return GRAD_MODES[self.target_grad]

    @classmethod
    def from_op_args(cls, s, m1, m2, m3, wrap_mode, grad_mode, normalize, sub_centers,
                     softcap, interclass) -> "MarginConfig":
        """Inverse of :meth:`op_args` (the scalars an op receives)."""
        if isinstance(softcap, (int, float)) and not isinstance(softcap, bool) \
                and softcap == 0:
            softcap = None
        return cls(s=s, m1=m1, m2=m2, m3=m3, margin_mode=_WRAP_NAMES[wrap_mode],
                   target_grad=_GRAD_NAMES[grad_mode], normalize=normalize,
                   sub_centers=sub_centers, softcap=softcap,
                   interclass_filtering_threshold=interclass)

    @property
    def softcap_arg(self) -> float:
        """The ops' ``softcap`` argument (0.0 = off)."""
        return 0.0 if self.softcap is None else float(self.softcap)

    def op_args(self) -> tuple:
        """The scalars in the order of the op schema (after x, w, labels, index, bias)."""
        return (float(self.s), float(self.m1), float(self.m2), float(self.m3),
                self.wrap_code, self.grad_code, self.normalize, self.sub_centers,
                self.softcap_arg, float(self.interclass_filtering_threshold))


def check_grad_filter(grad_filter: float) -> float:
    """The ops' grad_filter argument: eps in [0, 1) (0 = the exact gradient)."""
    if isinstance(grad_filter, bool) or not isinstance(grad_filter, (int, float)) \
            or not 0.0 <= grad_filter < 1.0:
        raise ValueError(f"grad_filter must be in [0, 1) (0 = exact gradient), "
                         f"got {grad_filter!r}")
    return float(grad_filter)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")


def check_label_smoothing(label_smoothing: float) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a real number, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class LossOptions:
    """The knobs around the math, shared by arcface_loss, ArcFaceLoss and PartialFC.

    reduction: "mean" | "sum" | "none"; ignore_index: label of rows that do not count;
    label_smoothing: eps in [0, 1]; chunk_size: classes per chunk, wherever a backend
    materializes a [rows, chunk * K] tile (None = as many as WORKSPACE_BYTES holds);
    backend: a backend name or "auto"; grad_filter_eps: None (exact
    gradient) or eps in (0, 1): softmax values below it may count as 0 in the backward.
    """

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    chunk_size: Optional[int] = None
    backend: str = "auto"
    grad_filter_eps: Optional[float] = None

    def __post_init__(self) -> None:
        check_reduction(self.reduction)
        check_label_smoothing(self.label_smoothing)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if self.chunk_size is not None and (
                isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, "
                             f"got {self.chunk_size!r}")
        eps = self.grad_filter_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                                or not 0.0 < eps < 1.0):
            raise ValueError(f"grad_filter_eps must be None or a float in (0, 1), "
                             f"got {eps!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a str, got {self.backend!r}")
        if self.backend != "auto" and self.backend not in ALL_BACKENDS:
            # a typo fails here, when a module is built, not at its first forward; whether
            # a known backend is usable on the tensors' device is checked per call
            raise ValueError(f"backend must be 'auto' or one of {list(ALL_BACKENDS)}, "
                             f"got {self.backend!r}")

    @property
    def block(self) -> int:
        """The ops' ``block`` argument (0 = backend default)."""
        return 0 if self.chunk_size is None else self.chunk_size

    @property
    def grad_filter(self) -> float:
        """The ops' ``grad_filter`` argument (0.0 = exact gradient)."""
        return 0.0 if self.grad_filter_eps is None else float(self.grad_filter_eps)
