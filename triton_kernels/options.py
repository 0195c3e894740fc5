"""The triton backend's switches: read from the environment once, at import, into one
:class:`Options` object (``OPTIONS``), which the launchers, the configs and the static
report read.

  ARCFACE_TRITON_AUTOTUNE=1          autotune the tile kernels instead of the fixed
                                     configs (GPU only)
  ARCFACE_TRITON_FP32_PRECISION      ieee (default) | tf32x3 | tf32: dot precision for
                                     float32 inputs
  ARCFACE_TRITON_WORKSPACE_MB        the backward's gradient-tile workspace H, MiB
                                     (default 16): classes per chunk = this / (N K bytes)
  ARCFACE_TRITON_DW_FP32=1           hold dW in float32 until the end (half inputs; a
                                     class repeated in the Partial-FC index then
                                     accumulates in fp32), C K D x 4 bytes more
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

PRECISIONS = {"ieee": 0, "tf32": 1, "tf32x3": 2}


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class Options:
    autotune: bool = False
    fp32_precision: str = "ieee"
    workspace_bytes: int = 16 << 20
    dw_fp32: bool = False

    @property
    def fp32_prec(self) -> int:
        """The kernels' FP32_PREC code of ``fp32_precision``."""
        return PRECISIONS[self.fp32_precision]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Options":
        prec = env.get("ARCFACE_TRITON_FP32_PRECISION", "ieee")
        if prec not in PRECISIONS:
            raise ValueError(f"ARCFACE_TRITON_FP32_PRECISION must be one of "
                             f"{sorted(PRECISIONS)}, got {prec!r}")
        ws = env.get("ARCFACE_TRITON_WORKSPACE_MB", "16")
        try:
            mb = int(ws)
        except ValueError:
            raise ValueError(f"ARCFACE_TRITON_WORKSPACE_MB must be an integer, got {ws!r}") \
                from None
        if mb <= 0:
            raise ValueError(f"ARCFACE_TRITON_WORKSPACE_MB must be positive, got {ws!r}")
        return cls(autotune=_flag(env, "ARCFACE_TRITON_AUTOTUNE"), fp32_precision=prec,
                   workspace_bytes=mb << 20, dw_fp32=_flag(env, "ARCFACE_TRITON_DW_FP32"))


#: The options of this process (the environment at import).
OPTIONS = Options.from_env()
