"""Launch configurations of the triton backend: fixed defaults, opt-in autotuning.

Defaults were chosen by reasoning for H100/H200 (132 SMs, 228 KiB shared memory and
64K registers per SM), not measured (no GPU run exists yet):

* fp16/bf16 tiles 128 x 128 with BLOCK_D = 64, 8 warps, 3 stages: a 128 x 128 fp32
  accumulator is 64 registers per thread at 256 threads, leaving room for the epilogue;
  one stage is (128 + 128) x 64 x 2 B = 32 KiB of shared memory, 96 KiB for three; each
  tile does 2 x 128 x 128 x 64 FLOPs per 32 KiB loaded (1 FLOP/B from shared memory per
  64-wide step, reused from L2 across the row blocks of a split).
* sub-centers (K > 1), fp16/bf16: BLOCK_N = 64 (the running best over the sub-centers
  and, in the backward, the arg-max sub-center are two more [BN, BC] tensors: at
  128 x 128 ptxas spills ~3 KB per thread in the backward and ~0.1 KB (sm_90a) / ~0.9
  KB (sm_80) in the forward; at 64 x 128 ~nothing. Compiled for sm_90a / sm_80 with
  Triton 3.6 and 3.9 on a CPU, not run).
* fp32: 64 x 64 x 32; ieee (FMA dots): 8 warps (at 4 ptxas spills, at 8 it does not);
  tf32 / tf32x3 (tensor cores): 4 warps (no spills; and Triton 3.0 / 3.1 abort with an
  assertion in Allocation.cpp compiling the tf32x3 dot with 8 warps for sm_90);
  float64: 32 x 32 x 4,
  4 warps (no tl.dot: broadcast products of 32 x 4 x 32 = 4K float64 values per step,
  32 per thread, so the [BN, BD, BC] product stays well inside the 255-register budget;
  float64 is for tests / gradcheck, not speed).
* Under TRITON_INTERPRET=1: 16 x 16 x 16 tiles, so that the small test shapes still
  cover several row blocks, class blocks, D steps and class splits.

Environment switches (read at import):
  ARCFACE_TRITON_AUTOTUNE=1          autotune the tile kernels (GPU only; ``autotuned``)
  ARCFACE_TRITON_FP32_PRECISION      ieee (default) | tf32x3 | tf32 for fp32 inputs
  ARCFACE_TRITON_WORKSPACE_MB        backward gradient-tile workspace (default 16 MiB)
"""
import os

import torch
import triton

AUTOTUNE = os.environ.get("ARCFACE_TRITON_AUTOTUNE", "0") not in ("", "0")

_PRECISIONS = {"ieee": 0, "tf32": 1, "tf32x3": 2}
_prec = os.environ.get("ARCFACE_TRITON_FP32_PRECISION", "ieee")
if _prec not in _PRECISIONS:
    raise ValueError(f"ARCFACE_TRITON_FP32_PRECISION must be one of {sorted(_PRECISIONS)}, "
                     f"got {_prec!r}")
FP32_PREC = _PRECISIONS[_prec]

_ws = os.environ.get("ARCFACE_TRITON_WORKSPACE_MB", "16")
try:
    WORKSPACE_BYTES = int(_ws) << 20
except ValueError:
    raise ValueError(f"ARCFACE_TRITON_WORKSPACE_MB must be an integer, got {_ws!r}") from None
if WORKSPACE_BYTES <= 0:
    raise ValueError(f"ARCFACE_TRITON_WORKSPACE_MB must be positive, got {_ws!r}")

WAVES = 2                 # forward: aim for about 2 programs per SM
INTERPRET_PROGRAMS = 8    # interpreter: a few splits even for tiny shapes
COMBINE_BLOCK = 128
MAX_GRID_YZ = 65535       # CUDA limit of grid dimensions y and z (x: 2^31 - 1)

_GPU = {
    torch.float16: dict(BLOCK_N=128, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3),
    torch.bfloat16: dict(BLOCK_N=128, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3),
    torch.float32: dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=32, num_warps=8, num_stages=3),
    torch.float64: dict(BLOCK_N=32, BLOCK_C=32, BLOCK_D=4, num_warps=4, num_stages=1),
}
_INTERPRET = dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, num_warps=1, num_stages=1)


def tile_config(dtype: torch.dtype, interpreted: bool, sub_centers: int = 1) -> dict:
    """The fixed tile config of the forward / backward tile kernels for ``dtype``."""
    if interpreted:
        return dict(_INTERPRET)
    cfg = dict(_GPU[dtype])
    if sub_centers > 1 and dtype in (torch.float16, torch.bfloat16):
        cfg["BLOCK_N"] = 64
    if dtype == torch.float32 and FP32_PREC != _PRECISIONS["ieee"]:
        cfg["num_warps"] = 4
    return cfg


def norm_config(dtype: torch.dtype, interpreted: bool) -> dict:
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_D=16, num_warps=1)
    return dict(BLOCK_M=32, BLOCK_D=128, num_warps=4)


# Autotuning keeps the tile shape (BLOCK_N, BLOCK_C) of the fixed config, so that grids
# and partial-sum buffers do not depend on the chosen config, and tunes the D step,
# warps and pipeline stages.
_AUTOTUNE_SPACE = [(64, 8, 3), (32, 8, 4), (64, 4, 4), (128, 8, 2), (32, 4, 5)]
_TUNED = {}


def autotuned(kernel, name: str, dtype: torch.dtype, base: dict):
    """The autotuned variant of a tile kernel for ``dtype`` with the tile shape (BLOCK_N,
    BLOCK_C) of ``base``, the fixed config the launcher sized its grid for (built once,
    keyed on D)."""
    key = (name, dtype, base["BLOCK_N"], base["BLOCK_C"])
    if key not in _TUNED:
        configs = [triton.Config(dict(BLOCK_N=base["BLOCK_N"], BLOCK_C=base["BLOCK_C"],
                                      BLOCK_D=bd), num_warps=nw, num_stages=ns)
                   for bd, nw, ns in _AUTOTUNE_SPACE
                   # 4 warps hold a 128 x 128 fp32 tile in 128 registers per thread
                   # before the epilogue: ptxas spills 1-2 KB (sm_90a), not worth timing
                   if nw > 4 or base["BLOCK_N"] * base["BLOCK_C"] <= 64 * 128]
        _TUNED[key] = triton.autotune(configs=configs, key=["D"])(kernel)
    return _TUNED[key]
