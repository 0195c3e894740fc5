"""Backend registry: which implementations of the primitive exist, and which to use.

A backend is a pair of ops (see ``_ops.py``). "reference" and "chunked" are always here
and, being plain PyTorch, run on any device type (cpu, cuda, mps, xpu, ...);
"triton" needs an importable Triton and a CUDA device (or TRITON_INTERPRET=1, which runs
the kernels on the CPU: for tests); "cpp" needs the compiled extension
``arcface_kernels._C``. Optional backends are imported lazily, on first use, so importing
arcface_kernels never imports triton or touches CUDA.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ._config import ALL_BACKENDS


@dataclass(frozen=True)
class Backend:
    name: str
    fwd: Callable
    bwd: Callable
    devices: tuple  # device types it is built for
    any_device: bool = False  # plain PyTorch: also runs on any other device type

    def runs_on(self, device_type: str) -> bool:
        return self.any_device or device_type in self.devices


_LOADED: Dict[str, Backend] = {}
_LOAD_ERRORS: Dict[str, str] = {}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load(name: str) -> Optional[Backend]:
    if name in _LOADED:
        return _LOADED[name]
    if name in _LOAD_ERRORS:
        return None
    try:
        if name == "reference":
            from . import reference as mod
            be = Backend(name, mod.FWD_OP, mod.BWD_OP, ("cpu", "cuda"), any_device=True)
        elif name == "chunked":
            from . import chunked as mod
            be = Backend(name, mod.FWD_OP, mod.BWD_OP, ("cpu", "cuda"), any_device=True)
        elif name == "triton":
            if importlib.util.find_spec("triton") is None:
                raise ImportError("triton is not installed")
            from . import _triton as mod
            devices = ("cuda", "cpu") if triton_interpreted() else ("cuda",)
            be = Backend(name, mod.FWD_OP, mod.BWD_OP, devices)
        elif name == "cpp":
            from . import _cpp as mod
            be = Backend(name, mod.FWD_OP, mod.BWD_OP, mod.DEVICES)
        else:
            raise KeyError(name)
    except (ImportError, OSError, AttributeError, RuntimeError) as e:
        reason = f"{type(e).__name__}: {e}"
        if name == "cpp":
            reason += _shadowing_note()
        _LOAD_ERRORS[name] = reason
        return None
    _LOADED[name] = be
    return be


def _shadowing_note() -> str:
    """Why the extension may be missing although it was built: a source tree (the
    current directory of a checkout) shadowing an installed copy that has it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        files = importlib.metadata.distribution("arcface-kernels").files or []
    except importlib.metadata.PackageNotFoundError:
        return ""
    for f in files:
        parts = str(f).replace("\\", "/").split("/")
        if len(parts) == 2 and parts[0] == "arcface_kernels" and parts[1].startswith("_C") \
                and parts[1].endswith((".so", ".pyd")):
            installed = os.path.dirname(os.path.abspath(str(f.locate())))
            if os.path.exists(str(f.locate())) and installed != here:
                return (f" (arcface_kernels is imported from {here}, a source tree that "
                        f"shadows the installed package at {installed}, which has the "
                        f"extension: run from another directory, or install the checkout "
                        f"with pip install -e .)")
    return ""


_WARNED: set = set()


def _warn_fallback(skipped: str, chosen: str, device_type: str) -> None:
    """Once per process and backend: "auto" passed over a backend that failed to load."""
    if skipped in _WARNED:
        return
    _WARNED.add(skipped)
    warnings.warn(f"arcface_kernels: backend 'auto' uses {chosen!r} on {device_type}, "
                  f"because the {skipped!r} backend failed to load: "
                  f"{_LOAD_ERRORS.get(skipped, 'unknown reason')}. "
                  f"`arcface-kernels info` shows every backend's status.",
                  RuntimeWarning, stacklevel=3)


def backend_status() -> Dict[str, str]:
    """Every backend name -> "ok (devices)" or why it is unavailable."""
    out = {}
    for name in ALL_BACKENDS:
        be = _load(name)
        if be is None:
            out[name] = "unavailable: " + _LOAD_ERRORS.get(name, "unknown")
        elif not _usable_somewhere(be):
            out[name] = "unavailable: needs a CUDA device (set TRITON_INTERPRET=1 to run " \
                        "the Triton kernels on the CPU)"
        else:
            out[name] = "ok (" + _device_list(be) + ")"
    return out


def _device_list(be: Backend) -> str:
    return ", ".join(be.devices) + (", any other torch device" if be.any_device else "")


def _usable_somewhere(be: Backend) -> bool:
    return "cpu" in be.devices or torch.cuda.is_available()


def _not_installed(name: str) -> bool:
    """An optional dependency simply absent (not a failure worth a warning): triton."""
    return name == "triton" and _LOAD_ERRORS.get(name, "").endswith("triton is not installed")


def available_backends() -> List[str]:
    """Names of the backends usable on this machine (for some device)."""
    return [n for n in ALL_BACKENDS if (be := _load(n)) is not None and _usable_somewhere(be)]


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend to run on tensors of ``device``; "auto" picks the fastest usable one:
    triton, then cpp, then chunked on CUDA; cpp, then chunked on the CPU; chunked on any
    other device type (plain PyTorch: MPS, XPU, ...)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {name!r}")
    dev = device.type
    if name == "auto":
        order = ("triton", "cpp", "chunked") if dev == "cuda" else ("cpp", "chunked")
        failed = []
        for cand in order:
            be = _load(cand)
            if be is None and cand != "chunked" and not _not_installed(cand):
                failed.append(cand)
            if be is not None and be.runs_on(dev) and (cand != "triton" or dev == "cuda"):
                if _device_unsupported(cand, device) is not None:
                    continue  # e.g. cpp's CUDA kernels below compute capability 8.0
                for f in failed:
                    _warn_fallback(f, cand, dev)
                return be
        raise RuntimeError(f"no backend runs on device type {dev!r}")
    if name not in ALL_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {available_backends()}, "
                         f"got {name!r}")
    be = _load(name)
    if be is None:
        raise ValueError(f"backend {name!r} is not available here "
                         f"({_LOAD_ERRORS.get(name, 'unknown reason')}); available: "
                         f"{available_backends()}")
    if not be.runs_on(dev):
        raise ValueError(f"backend {name!r} does not run on {dev} tensors "
                         f"(it runs on: {_device_list(be)})")
    why = _device_unsupported(name, device)
    if why is not None:
        raise ValueError(f"backend {name!r} cannot run on {device}: {why}")
    return be


def _device_unsupported(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on this particular device (None: it can). Asked at
    call time, never at import: the cpp backend's CUDA kernels need compute capability
    8.0 or newer (bfloat16 tensor cores, cp.async)."""
    if name != "cpp" or device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return (f"its CUDA kernels need compute capability 8.0 or newer, and this device "
                f"has {major}.{minor} (the triton and chunked backends run there)")
    return None
