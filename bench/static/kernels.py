"""The compiled kernels of both GPU backends, and what each launch asks of them.

* Triton: every launch the traced step made (kernel, arguments, constexprs, warps,
  stages) is compiled for a target with ``triton.compile`` against
  ``GPUTarget("cuda", 90 or 80, 32)``, specialized exactly as Triton's launcher would
  specialize those arguments (its own binder does it: divisibility by 16, alignment).
* cpp: the extension's CUDA objects from its own FORCE_CUDA build (``setup.py build_ext``
  with ``TORCH_CUDA_ARCH_LIST="8.0;9.0a"``), one template instance per dtype: the general
  kernels instantiated on CUDA's types (``__nv_bfloat16``, ``__half``, ``float``), the
  fused CuTe kernels on CUTLASS's (``cutlass::bfloat16_t``, ``cutlass::half_t``). Which
  of them a step launches depends on the device: the host code picks the fused
  ``*_sm90_tma_kernel`` on sm_90 (``*_sm90_kernel`` with a Partial FC index) and the
  ``*_sm80_kernel`` on sm_80..sm_89, so the report traces the cpp backend once per
  architecture, with that capability.

:data:`SPECS` says, per kernel, its role and how much work one launch is: programs
(blocks), tiles per program, tensor-core FLOPs per tile and compulsory HBM bytes (every
operand read once and every result written once; re-reads are assumed to hit L2). These
formulas restate the kernels' own tiling; change them with the kernels.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import math
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

from . import sass
from .trace import TensorArg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHES = {"sm_90a": 90, "sm_80": 80}


@dataclasses.dataclass
class Work:
    """One launch: ``programs`` blocks of ``threads`` threads, each doing ``tiles`` tiles of
    ``tile_flops`` tensor-core (or FMA) FLOPs; ``bytes`` of compulsory HBM traffic."""
    programs: int
    threads: int
    tiles: float = 1.0
    tile_flops: float = 0.0
    bytes: float = 0.0


@dataclasses.dataclass
class Spec:
    role: str                                 # fwd_main, bwd_main or aux
    work: Callable[[dict], Work]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _elt(dtype) -> int:
    if isinstance(dtype, str):
        return {"BFloat16": 2, "Half": 2, "Float": 4, "bfloat16": 2, "float16": 2,
                "float32": 4, "float64": 8}[dtype]
    return dtype.itemsize


def _programs(grid) -> int:
    n = 1
    for g in grid:
        n *= int(g)
    return n


# --------------------------------------------------------------------------- Triton
def _targs(launch: dict) -> Dict[str, object]:
    """The launch's arguments by the kernel's parameter names."""
    names = [p.name for p in launch["kernel"].params]
    return dict(zip(names, launch["args"]))


def _t_inv_norm(l: dict) -> Work:
    a = _targs(l)
    m, d = int(a["M"]), int(a["D"])
    src: TensorArg = a["src_ptr"]
    return Work(_programs(l["grid"]), 32 * l["meta"]["num_warps"],
                bytes=m * d * _elt(src.dtype) + 4 * m)


def _t_tile_flops(meta: dict, d: int) -> float:
    return 2.0 * meta["BLOCK_N"] * meta["BLOCK_C"] * meta.get("K", 1) \
        * _cdiv(d, meta["BLOCK_D"]) * meta["BLOCK_D"]


def _t_target(l: dict) -> Work:
    a = _targs(l)
    n, d = int(a["N"]), int(a["D"])
    k = l["meta"].get("K", 1)
    return Work(_programs(l["grid"]), 32 * l["meta"]["num_warps"],
                bytes=n * (1 + k) * d * _elt(a["x_ptr"].dtype) + 40 * n)


def _t_fwd(l: dict) -> Work:
    a, meta = _targs(l), l["meta"]
    n, c, d = int(a["N"]), int(a["C"]), int(a["D"])
    k = meta.get("K", 1)
    elt = _elt(a["x_ptr"].dtype)
    programs = _programs(l["grid"])
    tiles = _cdiv(n, meta["BLOCK_N"]) * _cdiv(c, meta["BLOCK_C"])
    splits = int(l["grid"][1])
    return Work(programs, 32 * meta["num_warps"], tiles / programs,
                _t_tile_flops(meta, d),
                bytes=(n + c * k) * d * elt + 4 * (n + c * k) + 8 * n + 16 * n * splits)


def _t_combine(l: dict) -> Work:
    a = _targs(l)
    n, sp = int(a["N"]), int(a["SPLITS"])
    return Work(_programs(l["grid"]), 32 * l["meta"].get("num_warps", 4),
                bytes=16 * n * sp + 36 * n)   # 3 fp32 + 1 int32 partials; 4 + 1 outputs


def _t_grad(l: dict) -> Work:
    a, meta = _targs(l), l["meta"]
    n, cc, d = int(a["N"]), int(a["C_chunk"]), int(a["D"])
    k = meta.get("K", 1)
    elt = _elt(a["x_ptr"].dtype)
    programs = _programs(l["grid"])
    stored = _cdiv(cc, meta["BLOCK_C"]) * meta["BLOCK_C"] * k
    return Work(programs, 32 * meta["num_warps"], 1.0, _t_tile_flops(meta, d),
                bytes=(n + cc * k) * d * elt + n * stored * elt + 4 * cc * k + 24 * n)


def _t_bias_sum(l: dict) -> Work:
    """dbias of a backward chunk: ROW_BLOCKS partial rows of C_chunk read, one written."""
    a = _targs(l)
    rb, cc = int(a["ROW_BLOCKS"]), int(a["C_chunk"])
    acc = a["out_ptr"].dtype.itemsize
    return Work(_programs(l["grid"]), 32 * l["meta"].get("num_warps", 4),
                bytes=(rb + 1) * cc * acc)


def _t_mm(l: dict) -> Work:
    """Both products of a chunk: 2 N R D FLOPs each (tiles padded), H read once per
    product, the fp32 partials of dX read (after the first chunk) and written, U's
    written."""
    a, meta = _targs(l), l["meta"]
    n, cc, d = int(a["N"]), int(a["C_chunk"]), int(a["D"])
    k = meta.get("K", 1)
    r = cc * k
    sx, sw, first = int(a["SPLIT_X"]), int(a["SPLIT_W"]), int(a["FIRST"])
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    elt = _elt(a["x_ptr"].dtype)
    acc = 8 if a["vx_ptr"].dtype.itemsize == 8 else 4
    pad = lambda v, b: _cdiv(v, b) * b   # noqa: E731
    flops = 2.0 * (pad(n, bm) * pad(r, bk) + pad(r, bm) * pad(n, bk)) * pad(d, bn)
    programs = _programs(l["grid"])
    return Work(programs, 32 * meta["num_warps"], 1.0, flops / programs,
                bytes=2 * n * r * elt + (r + n) * d * elt
                + sx * n * d * acc * (1 if first else 2) + sw * r * d * acc)


def _t_proj(l: dict) -> Work:
    a, meta = _targs(l), l["meta"]
    rows, d, splits = int(a["rows"]), int(a["D"]), int(a["splits"])
    acc = 8 if a["part_ptr"].dtype.itemsize == 8 else 4
    elt = _elt(a["src_ptr"].dtype)
    passes = 1 if meta.get("ONE_PASS", True) else 2
    return Work(_programs(l["grid"]), 32 * meta["num_warps"],
                bytes=rows * d * (passes * splits * acc + passes * elt + elt) + 4 * rows)


# ----------------------------------------------------------------------------- CUDA
#: The general tile kernels (arcface_cuda.cu: fwd_kernel, grad_chunk_kernel and their
#: *_terms_kernel instances; float32, K > 1, a bias / softcap / interclass term): tiles of
#: BM rows of x by TW rows of w (host.h BM, TW), BK features per k step.
CUDA_BM, CUDA_TW, CUDA_BK = 64, 64, 32   # csrc/cuda/host.h, arcface_cuda.cu
#: The fused tensor-core kernels (fused.cuh, tiles.h; float16 / bfloat16, K = 1, no
#: terms): CTA tile (rows of x, classes, features), pipeline stages, threads. Their
#: launch records carry the tile and the dynamic shared memory (sizes bm, bn, bk, smem:
#: host.h's FUSED*_SMEM, the stages of the operand tiles plus the column norms), which
#: the model uses; these are for reference and the tests.
CUDA_FUSED = {
    # wgmma m64n128k16 (HGMMA), 2 warpgroups along M, 3-stage pipeline: TMA boxes where
    # the rows of w are contiguous (*_sm90_tma_kernel), else cp.async (the index's gather)
    "sm90": dict(bm=128, bn=128, bk=64, stages=3, threads=256),
    # mma.sync m16n8k16 (HMMA) + ldmatrix, 4 warps along M, 3-stage cp.async pipeline
    "sm80": dict(bm=128, bn=64, bk=64, stages=3, threads=128),
}
CUDA_FUSED_CTAS_PER_SM = 2   # host.h FUSED_CTAS_PER_SM: both are sized for two per SM


def fused_pipeline_bytes(kind: str, elt: int = 2) -> int:
    """Shared memory of a fused kernel's operand stages (x and w tiles of bk features)."""
    c = CUDA_FUSED[kind]
    return c["stages"] * (c["bm"] + c["bn"]) * c["bk"] * elt


def _c_tile_flops(d: int) -> float:
    return 2.0 * CUDA_BM * CUDA_TW * _cdiv(d, CUDA_BK) * CUDA_BK


def _c_rows(l: dict, rows: int, d: int, passes: float) -> Work:
    return Work(_programs(l["grid"]), l["threads"], bytes=passes * rows * d * _elt(l["dtype"])
                + 4 * rows)


def _c_fwd(l: dict) -> Work:
    s = l["sizes"]
    n, d, c, k = s["n"], s["d"], s["c"], s["k"]
    programs = _programs(l["grid"])
    tiles = _cdiv(n, CUDA_BM) * s["ntiles"]
    return Work(programs, l["threads"], tiles / programs, _c_tile_flops(d),
                bytes=(n + c * k) * d * _elt(l["dtype"]) + 4 * (n + c * k) + 8 * n
                + 24 * n * l["grid"][1])


def _c_grad(l: dict) -> Work:
    s = l["sizes"]
    n, d, k, jn = s["n"], s["d"], s["k"], s["jn"]
    programs = _programs(l["grid"])
    tiles = _cdiv(n, CUDA_BM) * _cdiv(jn, s["tc"])
    elt = _elt(l["dtype"])
    return Work(programs, l["threads"], tiles / programs, _c_tile_flops(d),
                bytes=(n + jn * k) * d * elt + n * jn * k * elt + 4 * (n + jn * k) + 24 * n)


def _c_fused(l: dict, grad: bool) -> Work:
    """A fused launch (fwd_/grad_ sm90_tma, sm90, sm80 kernels): grid (row tiles of
    bm, splits), each CTA a run of at most tiles_per_split class tiles of bn (the tiles
    per program are the average: row tiles x class tiles / CTAs), each class tile
    ceil(d / bk) k tiles of bm x bn x bk. Compulsory bytes: x and the launch's rows of w
    once (re-reads hit L2), their inverse norms, the labels (and the index); the forward
    writes the target and its per-(split, row) partials (4 floats and an int64: 24 B), the
    backward reads lse and the three upstream gradients and writes G [n, j_end - j_begin]
    (leading dimension ldg) in the input dtype."""
    s = l["sizes"]
    n, d = s["n"], s["d"]
    cols = s["j_end"] - s["j_begin"]
    bm, bn, bk = s["bm"], s["bn"], s["bk"]
    programs = _programs(l["grid"])
    tiles = _cdiv(n, bm) * s["tiles"]
    elt = _elt(l["dtype"])
    nbytes = (n + cols) * d * elt + 4 * (n + cols) + 8 * n + 8 * cols * int(bool(s["indexed"]))
    if grad:
        nbytes += 16 * n + n * cols * elt
    else:
        nbytes += 4 * n + 24 * n * int(l["grid"][1])
    return Work(programs, l["threads"], tiles / programs,
                2.0 * bm * bn * _cdiv(d, bk) * bk, bytes=nbytes)


def _c_dw_finish(l: dict) -> Work:
    """A chunk's rows of dw from its float32 G^T X_hat rows: those read (4 B each), w's
    rows read when normalizing (the radial term), the rows written in w's dtype."""
    s = l["sizes"]
    rows, d = s["rows"], s["d"]
    elt = _elt(l["dtype"])
    return Work(_programs(l["grid"]), l["threads"],
                bytes=rows * d * (4 + elt * (2 if s["normalize"] else 1)) + 4 * rows)


SPECS: Dict[Tuple[str, str], Spec] = {
    ("triton", "inv_norm_kernel"): Spec("aux", _t_inv_norm),
    ("triton", "target_kernel"): Spec("aux", _t_target),
    ("triton", "fwd_kernel"): Spec("fwd_main", _t_fwd),
    ("triton", "fwd_combine_kernel"): Spec("aux", _t_combine),
    ("triton", "grad_kernel"): Spec("bwd_main", _t_grad),
    ("triton", "bias_sum_kernel"): Spec("aux", _t_bias_sum),
    ("triton", "bwd_mm_kernel"): Spec("bwd_main", _t_mm),
    ("triton", "proj_rows_kernel"): Spec("aux", _t_proj),
    ("cpp", "inv_norm_kernel"): Spec("aux", lambda l: _c_rows(
        l, l["sizes"]["rows"], l["sizes"]["d"], 1)),
    ("cpp", "fwd_kernel"): Spec("fwd_main", _c_fwd),
    ("cpp", "fwd_terms_kernel"): Spec("fwd_main", _c_fwd),
    ("cpp", "fwd_sm90_kernel"): Spec("fwd_main", lambda l: _c_fused(l, False)),
    ("cpp", "fwd_sm90_tma_kernel"): Spec("fwd_main", lambda l: _c_fused(l, False)),
    ("cpp", "fwd_sm80_kernel"): Spec("fwd_main", lambda l: _c_fused(l, False)),
    ("cpp", "fwd_combine_kernel"): Spec("aux", lambda l: Work(
        _programs(l["grid"]), l["threads"],
        bytes=24 * l["sizes"]["n"] * l["sizes"]["splits"] + 20 * l["sizes"]["n"])),
    ("cpp", "scaled_rows_kernel"): Spec("aux", lambda l: _c_rows(
        l, l["sizes"]["rows"], l["sizes"]["d"], 2)),
    ("cpp", "grad_chunk_kernel"): Spec("bwd_main", _c_grad),
    ("cpp", "grad_chunk_terms_kernel"): Spec("bwd_main", _c_grad),
    ("cpp", "grad_sm90_kernel"): Spec("bwd_main", lambda l: _c_fused(l, True)),
    ("cpp", "grad_sm90_tma_kernel"): Spec("bwd_main", lambda l: _c_fused(l, True)),
    ("cpp", "grad_sm80_kernel"): Spec("bwd_main", lambda l: _c_fused(l, True)),
    ("cpp", "dw_chunk_finish_kernel"): Spec("aux", _c_dw_finish),
    ("cpp", "dx_finish_kernel"): Spec("aux", lambda l: Work(
        _programs(l["grid"]), l["threads"],
        bytes=l["sizes"]["n"] * l["sizes"]["d"] * (2 * _elt(l["dtype"]) + 4)
        + 4 * l["sizes"]["n"])),
}


def spec_of(backend: str, name: str) -> Spec:
    try:
        return SPECS[(backend, name)]
    except KeyError:
        raise KeyError(f"bench/static/kernels.py has no spec for the {backend} kernel "
                       f"{name!r}: add its role and work to SPECS") from None


# ------------------------------------------------------------------ Triton compilation
_BINDERS: Dict[Tuple[int, int], tuple] = {}


def _binder(fn, cap: int):
    """Triton's own argument binder / specializer for ``fn`` on a target of capability
    ``cap`` (what a launch on such a GPU runs), built once per kernel."""
    key = (id(fn), cap)
    if not hasattr(fn, "_pack_args"):
        import triton
        raise RuntimeError(f"the static report compiles Triton kernels through Triton's own "
                           f"launcher binder (JITFunction._pack_args, triton >= 3.3); this "
                           f"is triton {triton.__version__}")
    if key not in _BINDERS:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        target = GPUTarget("cuda", cap, 32)
        backend = make_backend(target)
        _BINDERS[key] = (fn, target, backend,
                         create_function_from_signature(fn.signature, fn.params, backend))
    return _BINDERS[key][1:]


def triton_variant_key(launch: dict) -> str:
    """What makes two launches the same compiled kernel: the kernel, its constexprs and
    options, and the specialization of its runtime arguments (Triton's cache key)."""
    _, _, binder = _binder(launch["kernel"], 90)
    _, spec, opts = binder(*launch["args"], **launch["meta"])
    return f"{launch['name']}|{spec}|{sorted(opts.items())}"


def compile_triton(launch: dict, arch: str):
    """The launch's kernel compiled for ``arch`` (sm_90a / sm_80): (cubin bytes, metadata
    dict with num_warps, shared, name)."""
    import triton
    from triton.compiler import ASTSource
    fn = launch["kernel"]
    target, backend, binder = _binder(fn, ARCHES[arch])
    meta = dict(launch["meta"])
    bound, specialization, options = binder(*launch["args"], **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound,
                                                          specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    md = kernel.metadata
    return kernel.asm["cubin"], dict(num_warps=md.num_warps, shared=md.shared,
                                     name=md.name, num_stages=getattr(md, "num_stages", None))


def triton_sizes(launch: dict) -> dict:
    """The launch's integer arguments and constexprs by name (for ``@trips`` annotations)."""
    out = {k: v for k, v in _targs(launch).items() if isinstance(v, (int, float))}
    out.update({k: v for k, v in launch["meta"].items() if isinstance(v, (int, float))})
    return out


# ------------------------------------------------------------------------ CUDA objects
#: What the CUDA object is compiled from: the .cu and every header of csrc/ it includes.
CUDA_OBJECT_INPUTS = ("csrc/*.h", "csrc/cuda/*.cu", "csrc/cuda/*.cuh", "csrc/cuda/*.h",
                      "csrc/cuda/compat/**/*")


def _drop_stale_cuda_objects(build_dir: str) -> List[str]:
    """Remove the CUDA objects of ``build_dir`` older than any of their inputs. With a CPU
    build of torch, torch's ninja file gives nvcc no depfile (it asks nvcc for
    dependencies only when torch.version.cuda is set), so a change to a header alone
    (fused.cuh, tiles.h, host.h, arcface_math.h, ...) would leave a stale object that
    ninja calls up to date. Returns the removed paths."""
    inputs = [f for pat in CUDA_OBJECT_INPUTS
              for f in glob.glob(os.path.join(REPO, pat), recursive=True) if os.path.isfile(f)]
    if not inputs:
        return []
    newest = max(os.path.getmtime(f) for f in inputs)
    removed = []
    for obj in glob.glob(os.path.join(build_dir, "tmp", "**", "arcface_cuda.o"),
                         recursive=True):
        if os.path.getmtime(obj) < newest:
            os.remove(obj)
            removed.append(obj)
    return removed


def cuda_build(build_dir: str, log=None) -> str:
    """The extension's CUDA object (csrc/cuda/arcface_cuda.cu) compiled for sm_80 and
    sm_90a by setup.py's own FORCE_CUDA build into ``build_dir`` (ninja: a no-op when
    up to date; an object older than one of its headers is removed first, see
    :func:`_drop_stale_cuda_objects`). Returns the object's path."""
    for obj in _drop_stale_cuda_objects(build_dir):
        if log is not None:
            log(f"{os.path.relpath(obj, build_dir)} is older than its sources: rebuilding it")
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="8.0;9.0a",
               MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib",
           os.path.join(build_dir, "lib"), "--build-temp", os.path.join(build_dir, "tmp")]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:   # ninja prints the compiler's errors on stdout
        errors = [ln for ln in out.stdout.splitlines() if " error" in ln or "error:" in ln]
        raise RuntimeError("the extension's CUDA build failed:\n" + "\n".join(errors[:20])
                           + "\n" + out.stdout[-3000:] + out.stderr[-1500:])
    objs = glob.glob(os.path.join(build_dir, "tmp", "**", "arcface_cuda.o"), recursive=True)
    if not objs:
        raise RuntimeError(f"no arcface_cuda.o under {build_dir}")
    return objs[0]


#: The template arguments of a c10 dtype's kernel instances: CUDA's own types for the
#: general kernels (arcface_cuda.cu), CUTLASS's for the fused CuTe ones (fused.cuh).
_CUDA_TYPES = {"BFloat16": ("__nv_bfloat16", "cutlass::bfloat16_t"),
               "Half": ("__half", "cutlass::half_t"), "Float": ("float",)}


def cuda_function(codes: Dict[str, sass.Code], names: Dict[str, str], kernel: str,
                  dtype: str) -> Optional[sass.Code]:
    """The Code of ``kernel``'s template instance for ``dtype`` (c10 name, e.g.
    BFloat16) among the cubin's functions (``names``: mangled -> demangled)."""
    want = _CUDA_TYPES.get(dtype, (dtype,))
    for mangled, code in codes.items():
        dem = names.get(mangled, mangled).replace("(anonymous namespace)::", "")
        if dem.startswith("void "):
            dem = dem[5:]
        head = re.split(r"[<(]", dem, maxsplit=1)[0]
        if head.split("::")[-1] != kernel:
            continue
        rest = dem[len(head):]
        if not rest.startswith("<"):
            return code
        if rest[1:].split(">", 1)[0].strip() in want:
            return code
    return None


@functools.lru_cache(maxsize=None)
def _source_lines(path: str) -> Tuple[str, ...]:
    """The lines of a source file named in the line info (the build may have run in
    another checkout: matched by the path under csrc/ or triton_kernels/)."""
    cands = [path]
    for root in ("csrc/", "triton_kernels/"):
        if root in path:
            cands.append(os.path.join(REPO, root + path.split(root, 1)[1]))
    for p in cands:
        if os.path.exists(p):
            with open(p) as f:
                return tuple(f.readlines())
    return ()


def source_line(path: str, line: int) -> str:
    """A line of a source file named in the line info ("" when it cannot be read)."""
    lines = _source_lines(path)
    return lines[line - 1] if 0 < line <= len(lines) else ""


def per_tile(ins: sass.Instr) -> bool:
    """Whether an instruction comes from a ``@per_tile`` line: its own source line or a
    call site it was inlined at carries the annotation (a comment), which says that the
    code of that line runs once per tile although it sits in the main loop (work done on
    the first or last k step of a tile behind a branch: the model counts it with the
    epilogue, once per tile, instead of once per main-loop iteration)."""
    return any("@per_tile" in source_line(*site) for site in ins.lines)


def _size_expr(expr: str, sizes: dict):
    """An annotation's expression (``@trips[EXPR]``, ``@cold[EXPR]``) over the launch's
    sizes, with cdiv, ceil, min and max."""
    env = dict(sizes, cdiv=_cdiv, ceil=math.ceil, min=min, max=max)
    return eval(expr, {"__builtins__": {}}, env)


def cold(ins: sass.Instr, sizes: dict) -> bool:
    """Whether an instruction comes from a ``@cold`` line (its own source line or a call
    site it was inlined at carries the annotation, a comment): code that runs only for
    inputs outside the modelled cases (a norm whose sum of squares overflows, a division
    taken only with sub-centers), counted 0 like a ``@trips[0]`` loop. ``@cold[EXPR]``
    is cold where EXPR, over the launch's sizes, is true (``@cold[k == 1]``).
    Subroutines (code reached by CALL) are cold too: the CUDA library's are the slow
    paths of IEEE division, reciprocal and square root (special and denormal operands)
    and of 64-bit integer division (operands wider than 32 bits), which their inline fast
    paths call only for such operands; the kernels' own ``__noinline__`` functions are
    kept for such paths only (arcface_cuda.cu ``w_row_sub``: sub-centers)."""
    if ins.subroutine:
        return True
    for site in ins.lines:
        line = source_line(*site)
        if "@cold" not in line:
            continue
        m = re.search(r"@cold\[([^\]]*)\]", line)
        if m is None:
            return True
        if _size_expr(m.group(1), sizes):
            return True
    return False


def loop_trips(loop: sass.Loop, sizes: dict) -> Optional[float]:
    """Trip count of a loop outside the main loop from a ``@trips[EXPR]`` annotation on
    its source line (a comment; EXPR over the launch's sizes), or None."""
    if loop.line is None:
        return None
    m = re.search(r"@trips\[([^\]]*)\]", source_line(*loop.line))
    if m is None:
        return None
    return float(_size_expr(m.group(1), sizes))


def hash_of(*parts) -> str:
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:12]
