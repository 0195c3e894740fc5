"""What the benchmark measures: providers of one loss call on shared inputs.

A provider turns a :class:`Problem` and its inputs into a :class:`Bound`: a callable that
returns the scalar loss (with autograd attached) and the leaf tensors that receive
gradients. Providers never import optional packages at module import time; whether one
can run is asked through :meth:`Provider.skip_reason`, which returns a message (the row
is then written as skipped with that message) or None.

Providers:
  reference  arcface_kernels.reference.reference_loss (materializes N x C; the baseline)
  compile    torch.compile(reference_loss) (inductor; C++ compiler needed on the CPU)
  chunked, triton, cpp and any later backend
             arcface_kernels.arcface_loss(backend=name), generically: a backend is run when
             arcface_kernels.available_backends() lists it and it runs on the device
  cce        cut_cross_entropy.linear_cross_entropy (plain linear CE; CUDA)
  liger      liger_kernel LigerFusedLinearCrossEntropyLoss (plain linear CE; CUDA)
  pml        pytorch_metric_learning.losses.ArcFaceLoss (ArcFace; any device)
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import arcface_kernels as ak
from arcface_kernels.backends import ALL_BACKENDS, backend_status, resolve_backend, \
    triton_interpreted
from arcface_kernels._memory import available_bytes
from arcface_kernels.reference import reference_loss

# The loss configurations a benchmark can run (keyword arguments of arcface_loss).
LOSS_MODES: Dict[str, dict] = {
    "arcface": dict(s=64.0, m2=0.5),
    "linear_ce": dict(s=1.0, m2=0.0, normalize=False),
}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp64": torch.float64, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' / 'fp64' (or the torch names) -> torch.dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(set(DTYPES))}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'fp32' (the short names used in file names and the CSV)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64"}[dtype]


@dataclass(frozen=True)
class Problem:
    """One benchmark shape: embeddings [N, D], weight [C, D], labels [N]."""

    N: int
    C: int
    D: int
    dtype: torch.dtype
    device: torch.device
    loss: str = "arcface"

    def __post_init__(self):
        for name in ("N", "C", "D"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.loss not in LOSS_MODES:
            raise ValueError(f"loss must be one of {list(LOSS_MODES)}, got {self.loss!r}")

    @property
    def logits(self) -> int:
        return self.N * self.C


@dataclass
class Inputs:
    """Inputs shared by all providers of one problem (x and w require grad)."""

    x: Tensor
    w: Tensor
    y: Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.w, self.y))


def make_inputs(p: Problem, seed: int = 0) -> Inputs:
    """Random inputs (never zeros: zeros can run faster than real data), drawn on the
    device itself (a 1M x 512 weight takes seconds to draw on a host CPU)."""
    g = torch.Generator(device=p.device).manual_seed(seed)
    kw = dict(generator=g, device=p.device)
    x = torch.randn(p.N, p.D, **kw).to(p.dtype)
    w = torch.randn(p.C, p.D, **kw).to(p.dtype)
    y = torch.randint(0, p.C, (p.N,), **kw)
    return Inputs(x.requires_grad_(True), w.requires_grad_(True), y)


@dataclass
class Bound:
    """A provider bound to inputs: ``loss()`` runs the forward and returns the scalar
    loss; ``leaves`` are the tensors whose .grad the backward fills (reset between runs);
    ``retained_loss`` (optional) is a forward whose graph allows repeated backward calls
    (retain_graph=True), for the backward-only mode, when ``loss`` does not."""

    loss: Callable[[], Tensor]
    leaves: List[Tensor] = field(default_factory=list)
    loss_mode: str = "arcface"
    retained_loss: Optional[Callable[[], Tensor]] = None

    def zero_grads(self) -> None:
        for t in self.leaves:
            t.grad = None


class Provider:
    """Base class: one way of computing the loss. Subclasses set name/description and
    implement :meth:`bind`; :meth:`skip_reason` says why it cannot run (or None)."""

    name = "provider"
    description = ""
    kind = "ours"            # "ours", "baseline" or "peer"
    fixed_loss: Optional[str] = None   # peers run in one mode only

    def loss_mode(self, requested: str) -> str:
        """The loss mode this provider runs in when ``requested`` is asked for."""
        return self.fixed_loss or requested

    def skip_reason(self, p: Problem) -> Optional[str]:
        """A message why this provider cannot run ``p`` here, or None."""
        return None

    def memory_estimate(self, p: Problem) -> Optional[int]:
        """Rough bytes needed beyond the inputs (for providers that hold N x C)."""
        return None

    def bind(self, p: Problem, inp: Inputs) -> Bound:  # pragma: no cover - abstract
        raise NotImplementedError(f"provider {self.name!r} does not implement bind()")


def _bytes_per_logit(dtype: torch.dtype) -> int:
    # Measured on the CPU in fp32: the reference's fwd+bwd peaks at ~21 bytes per logit
    # (five fp32 N x C copies alive at once); rounded up, doubled in fp64.
    return 48 if dtype == torch.float64 else 24


class ReferenceProvider(Provider):
    name = "reference"
    description = "arcface_kernels.reference.reference_loss (naive PyTorch, N x C logits)"
    kind = "baseline"

    def memory_estimate(self, p: Problem) -> Optional[int]:
        return p.logits * _bytes_per_logit(p.dtype)

    def bind(self, p: Problem, inp: Inputs) -> Bound:
        kw = LOSS_MODES[p.loss]
        return Bound(lambda: reference_loss(inp.x, inp.w, inp.y, **kw), [inp.x, inp.w],
                     p.loss)


class CompiledReferenceProvider(ReferenceProvider):
    name = "compile"
    description = "torch.compile(reference_loss) (inductor)"
    kind = "baseline"

    def skip_reason(self, p: Problem) -> Optional[str]:
        if p.device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++",
                                                                          "clang++")):
            return "torch.compile on the CPU needs a C++ compiler (none on PATH)"
        if p.device.type == "cuda" and importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton (not installed)"
        return None

    def bind(self, p: Problem, inp: Inputs) -> Bound:
        kw = LOSS_MODES[p.loss]
        # A fresh, static-shape compilation per problem (compile time stays in the
        # warm-up). The compiled backward donates its saved buffers by default, which
        # forbids the retain_graph=True of the backward-only mode: a second compilation
        # without donation serves that mode (forward and full keep the default).
        torch._dynamo.reset()
        fn = torch.compile(lambda x, w, y: reference_loss(x, w, y, **kw), dynamic=False)
        fn_kept = torch.compile(lambda x, w, y: reference_loss(x, w, y, **kw),
                                dynamic=False)

        def retained():
            cfg = getattr(getattr(torch, "_functorch", None), "config", None)
            if cfg is None or not hasattr(cfg, "donated_buffer"):
                return fn_kept(inp.x, inp.w, inp.y)
            with cfg.patch(donated_buffer=False):
                return fn_kept(inp.x, inp.w, inp.y)
        return Bound(lambda: fn(inp.x, inp.w, inp.y), [inp.x, inp.w], p.loss, retained)


class BackendProvider(Provider):
    """Any backend of arcface_kernels, through the public arcface_loss(backend=name)."""

    kind = "ours"

    def __init__(self, backend: str, chunk_size: Optional[int] = None,
                 grad_filter_eps: Optional[float] = None, name: Optional[str] = None):
        self.backend = backend
        self.chunk_size = chunk_size
        self.grad_filter_eps = grad_filter_eps
        self.name = name or (backend if chunk_size is None else f"{backend}:{chunk_size}")
        self.description = f"arcface_kernels.arcface_loss(backend={backend!r}" + (
            "" if chunk_size is None else f", chunk_size={chunk_size}") + (
            "" if grad_filter_eps is None else f", grad_filter_eps={grad_filter_eps:g}") + ")"

    def skip_reason(self, p: Problem) -> Optional[str]:
        if self.backend not in ak.available_backends():
            return f"backend {self.backend!r} " + backend_status().get(
                self.backend, "is not a backend of arcface_kernels")
        if self.backend == "triton" and p.device.type == "cpu" and triton_interpreted():
            return "the triton backend runs on the CPU only in the interpreter " \
                   "(TRITON_INTERPRET=1): not benchmarked"
        try:
            resolve_backend(self.backend, p.device)
        except (ValueError, RuntimeError) as e:
            return str(e)
        return None

    def bind(self, p: Problem, inp: Inputs) -> Bound:
        kw = dict(LOSS_MODES[p.loss], backend=self.backend, chunk_size=self.chunk_size,
                  grad_filter_eps=self.grad_filter_eps)
        return Bound(lambda: ak.arcface_loss(inp.x, inp.w, inp.y, **kw), [inp.x, inp.w],
                     p.loss)


class PeerProvider(Provider):
    """A peer library; skipped with a message when its module is not installed."""

    kind = "peer"
    module = ""
    pip_name = ""
    needs_cuda = True

    def skip_reason(self, p: Problem) -> Optional[str]:
        if importlib.util.find_spec(self.module.split(".")[0]) is None:
            return f"{self.pip_name} is not installed (pip install {self.pip_name})"
        if self.needs_cuda and p.device.type != "cuda":
            return f"{self.pip_name} runs on CUDA devices only"
        if p.dtype == torch.float64:
            return f"{self.pip_name} is not benchmarked in float64"
        return None


class CCEProvider(PeerProvider):
    """CCE with its default gradient filter (filter_eps="auto"), or without (cce-nofilter:
    filter_eps=None, the exact gradient)."""
    name = "cce"
    description = "cut_cross_entropy.linear_cross_entropy (Apple CCE, linear CE; its " \
                  "default gradient filter)"
    module = "cut_cross_entropy"
    pip_name = "cut-cross-entropy"
    fixed_loss = "linear_ce"
    filter_eps: Optional[str] = "auto"

    def bind(self, p: Problem, inp: Inputs) -> Bound:
        from cut_cross_entropy import linear_cross_entropy
        eps = self.filter_eps
        return Bound(lambda: linear_cross_entropy(inp.x, inp.w, inp.y, filter_eps=eps),
                     [inp.x, inp.w], "linear_ce")


class CCENoFilterProvider(CCEProvider):
    name = "cce-nofilter"
    description = "cut_cross_entropy.linear_cross_entropy(filter_eps=None) (exact gradient)"
    filter_eps = None


class LigerProvider(PeerProvider):
    name = "liger"
    description = "liger_kernel LigerFusedLinearCrossEntropyLoss (linear CE)"
    module = "liger_kernel"
    pip_name = "liger-kernel"
    fixed_loss = "linear_ce"

    def bind(self, p: Problem, inp: Inputs) -> Bound:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        fn = LigerFusedLinearCrossEntropyLoss()
        return Bound(lambda: fn(inp.w, inp.x, inp.y), [inp.x, inp.w], "linear_ce")


class PMLProvider(PeerProvider):
    name = "pml"
    description = "pytorch_metric_learning.losses.ArcFaceLoss (ArcFace, m=0.5, s=64)"
    module = "pytorch_metric_learning"
    pip_name = "pytorch-metric-learning"
    needs_cuda = False
    fixed_loss = "arcface"

    def bind(self, p: Problem, inp: Inputs) -> Bound:
        from pytorch_metric_learning.losses import ArcFaceLoss
        # Older releases take the margin in degrees (default 28.6), newer in radians (0.5).
        default = inspect.signature(ArcFaceLoss).parameters["margin"].default
        margin = math.degrees(0.5) if isinstance(default, (int, float)) and default > 7 \
            else 0.5
        fn = ArcFaceLoss(num_classes=p.C, embedding_size=p.D, margin=margin, scale=64.0)
        fn = fn.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():  # the same classes as the others (pml stores W as [D, C])
            fn.W.copy_(inp.w.detach().T)
        return Bound(lambda: fn(inp.x, inp.y), [inp.x, fn.W], "arcface")


PEERS: Tuple[type, ...] = (CCEProvider, CCENoFilterProvider, LigerProvider, PMLProvider)

#: The triton backend with Cut Cross-Entropy's default filter threshold for bf16.
TRITON_FILTER_EPS = 2.0 ** -12


def all_providers() -> Dict[str, Provider]:
    """Every provider by name, in the order they are run: our backends, the reference,
    peers, then torch.compile (slowest to set up) last."""
    out: Dict[str, Provider] = {}
    for b in ALL_BACKENDS:
        if b != "reference":
            out[b] = BackendProvider(b)
    out["triton-filter"] = BackendProvider("triton", grad_filter_eps=TRITON_FILTER_EPS,
                                           name="triton-filter")
    out["reference"] = ReferenceProvider()
    for cls in PEERS:
        out[cls.name] = cls()
    out["compile"] = CompiledReferenceProvider()
    return out


def select_providers(names: Optional[List[str]]) -> List[Provider]:
    """Providers by name (None or ['all']: every one), in run order; a backend name may
    carry a chunk size, ``chunked:256`` (arcface_loss's chunk_size). ValueError on an
    unknown name or a bad chunk size."""
    every = all_providers()
    if not names or names == ["all"]:
        return list(every.values())
    out, unknown = [], []
    for n in names:
        base, _, size = n.partition(":")
        if size:
            if base not in ALL_BACKENDS or base == "reference":
                unknown.append(n)
            elif not size.isdigit() or int(size) < 1:
                raise ValueError(f"chunk size in provider {n!r} must be a positive int, "
                                 f"got {size!r}")
            else:
                out.append(BackendProvider(base, int(size)))
        elif n in every:
            out.append(every[n])
        else:
            unknown.append(n)
    if unknown:
        raise ValueError(f"providers must be among {list(every)} (or 'all'; backends "
                         f"also as NAME:CHUNK), got unknown {unknown}")
    order = list(every)
    return sorted(out, key=lambda p: order.index(p.name.partition(":")[0]))


def is_oom(e: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA or CPU allocator)."""
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(e)
    return "out of memory" in msg or "can't allocate memory" in msg


__all__ = ["LOSS_MODES", "Problem", "Inputs", "Bound", "Provider", "make_inputs",
           "all_providers", "select_providers", "parse_dtype", "dtype_name",
           "available_bytes", "is_oom"]
