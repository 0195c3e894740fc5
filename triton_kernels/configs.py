"""Launch configurations of the triton backend: fixed defaults, opt-in autotuning
(``options.OPTIONS.autotune``).

The defaults were chosen with the static kernel report (``python -m bench static``:
registers, spills, shared memory and the cost model of an H200, compiled on a CPU), not
measured on a GPU. See launch.py for the figures.

* Tile kernels (fwd_kernel, grad_kernel), fp16 / bf16: 128 x 128 logit tiles, BLOCK_D =
  64, 8 warps, 3 stages. Sub-centers (K > 1): BLOCK_N = 64 (the running best over the
  sub-centers and the arg-max sub-center are two more [BN, BC] tensors).
* fp32: 64 x 64 x 32; ieee (FMA dots): 8 warps; tf32 / tf32x3 (tensor cores): 4 warps
  (Triton 3.0 / 3.1 abort compiling the tf32x3 dot with 8 warps for sm_90).
* float64: 32 x 32 x 4, 4 warps (no tl.dot: broadcast products of 32 x 4 x 32 values;
  float64 is for tests / gradcheck, not speed).
* The backward's GEMMs (bwd_mm_kernel): 128 x 128 x 64, 8 warps, 3 stages for half
  types.
* Under TRITON_INTERPRET=1: 16-wide tiles, so that the small test shapes still cover
  several row blocks, class blocks, D steps, splits and chunks.
"""
import torch
import triton

from .options import OPTIONS

WAVES = 2                 # forward: aim for about 2 programs per SM
INTERPRET_PROGRAMS = 8    # interpreter: a few splits even for tiny shapes
COMBINE_BLOCK = 128
MAX_GRID_YZ = 65535       # CUDA limit of grid dimensions y and z (x: 2^31 - 1)
MM_PROGRAMS = 2           # backward GEMMs: split K until about this many programs per SM

_HALF_TILE = dict(BLOCK_N=64, BLOCK_C=128, BLOCK_D=64, num_warps=4, num_stages=3)
_GPU = {
    torch.float16: _HALF_TILE,
    torch.bfloat16: _HALF_TILE,
    torch.float32: dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=32, num_warps=8, num_stages=3),
    torch.float64: dict(BLOCK_N=32, BLOCK_C=32, BLOCK_D=4, num_warps=4, num_stages=1),
}
_HALF_MM = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
_GPU_MM = {
    torch.float16: _HALF_MM,
    torch.bfloat16: _HALF_MM,
    torch.float32: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    torch.float64: dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=4, num_warps=4, num_stages=1),
}
_INTERPRET = dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, num_warps=1, num_stages=1)
_INTERPRET_MM = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)


def tile_config(dtype: torch.dtype, interpreted: bool, sub_centers: int = 1) -> dict:
    """The fixed tile config of the forward / backward tile kernels for ``dtype``."""
    if interpreted:
        return dict(_INTERPRET)
    cfg = dict(_GPU[dtype])
    if sub_centers > 1 and dtype in (torch.float16, torch.bfloat16):
        cfg["BLOCK_N"] = 64
    if dtype == torch.float32 and OPTIONS.fp32_precision != "ieee":
        cfg["num_warps"] = 4
    return cfg


def mm_config(dtype: torch.dtype, interpreted: bool) -> dict:
    """The config of the backward's GEMM kernel for ``dtype``."""
    if interpreted:
        return dict(_INTERPRET_MM)
    cfg = dict(_GPU_MM[dtype])
    if dtype == torch.float32 and OPTIONS.fp32_precision != "ieee":
        cfg["num_warps"] = 4
    return cfg


def rows_config(interpreted: bool, d: int) -> dict:
    """Row kernels (inverse norms, the target, the projection of gradient rows): rows per
    program and the D step; ONE_PASS when a whole row fits the D step."""
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_D=32, ONE_PASS=d <= 32, num_warps=1)
    one = triton.next_power_of_2(max(d, 1)) <= 1024
    block_d = triton.next_power_of_2(max(d, 16)) if one else 256
    return dict(BLOCK_M=max(1, min(32, 4096 // block_d)), BLOCK_D=block_d, ONE_PASS=one,
                num_warps=4)


# Autotuning keeps the tile shape (BLOCK_N, BLOCK_C) of the fixed config, so that grids
# and workspaces do not depend on the chosen config, and tunes the D step, warps and
# pipeline stages.
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
                   if nw > 4 or base["BLOCK_N"] * base["BLOCK_C"] <= 64 * 128]
        _TUNED[key] = triton.autotune(configs=configs, key=["D"])(kernel)
    return _TUNED[key]
