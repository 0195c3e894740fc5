"""The cost model: a predicted time for every kernel of a traced step, from the compiled
code and the ceilings of :mod:`bench.static.hardware`. Every figure it gives is a
prediction, to be calibrated by a GPU run, never a measurement.

A kernel launch (``programs`` blocks, ``tiles`` tiles each; :class:`kernels.Work`) on a
GPU with S SMs, each SM running ``occ`` blocks at once (the occupancy rules), takes the
larger of three bounds, for the busiest SM (ceil(programs / S) blocks: the last wave):

    tensor   = blocks x tiles x tile FLOPs / (tensor-core rate / S)
    memory   = compulsory bytes / HBM bandwidth
    issue    = blocks x warps x instructions per warp / (4 warp instructions per clock)

Instructions per warp of one block, from the machine code (:mod:`bench.static.sass`):

    rest + tiles x (epilogue + iterations x main-loop body)

where ``iterations`` = tile FLOPs per warp / FLOPs of one pass over the main-loop body
(the tensor-core or FMA instructions must add up to the tile's FLOPs, however the loop
was unrolled or pipelined), ``epilogue`` = the tile loop's instructions outside the main
loop, ``rest`` = the instructions outside the tile loop; any other loop counts its
``@trips[...]`` annotation's trips (a comment on its source line), else once, and code
of a ``@per_tile`` line inside the main loop counts once per tile, with the epilogue
(:class:`Counts`), and code of a ``@cold`` line (or ``@cold[EXPR]`` where EXPR holds:
paths taken only for inputs outside the modelled cases) counts 0. A kernel without a
main loop counts its instructions once per block.

When only one block fits on an SM (and the kernel is not warp-specialized), nothing
overlaps the epilogue with the next tile's matrix multiply: the time is then
max(max(tensor, main-loop issue) + epilogue issue, memory) instead of the larger of the
three. Tensor-core rates: wgmma (HGMMA) at the measured cuBLAS rate; mma.sync (HMMA) on
Hopper at 2/3 of it; TF32 at half; FP32 FMA in the issue bound.

ATen ops of the launch path: a GEMM (mm, addmm) takes max(2MNK / rate, bytes / HBM);
any other op bytes / HBM. Every launch adds a device-side gap.

Host: the launch path's CPU time is the count of its events times their costs (Triton
launches, ATen ops with and without a kernel, C++ launches, custom-op calls). A phase
(forward, backward) takes max(device, host) when it has no host sync (the host runs
ahead of the GPU), device + host when it has one (each sync drains the queue).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

from . import hardware as hw
from . import sass
from .kernels import Work, cold, loop_trips, per_tile


@dataclasses.dataclass
class Compiled:
    """A kernel's compiled code with its launch configuration's occupancy."""
    code: sass.Code
    threads: int
    smem: int
    blocks_per_sm: int
    limiter: str
    warp_specialized: bool = False


@dataclasses.dataclass
class KernelTime:
    tensor_s: float
    memory_s: float
    issue_main_s: float
    issue_epilogue_s: float
    time_s: float
    bound: str
    insts_per_warp: float
    iterations_per_tile: float
    epilogue_per_tile: float


def tensor_kind(code: sass.Code) -> Optional[str]:
    ops = code.main.counts if code.main is not None else code.counts
    if any(o.startswith(("HGMMA", "QGMMA")) for o in ops):
        return "hgmma"
    if any(o.startswith("HMMA") and ".TF32" in o for o in ops):
        return "hmma_tf32"
    if any(o.startswith("HMMA") for o in ops):
        return "hmma"
    return None


def _contains(lp: sass.Loop, pc: int) -> bool:
    return lp.head <= pc <= lp.tail


def _strictly_inside(inner: sass.Loop, outer: sass.Loop) -> bool:
    return inner is not outer and outer.head <= inner.head and inner.tail <= outer.tail


@dataclasses.dataclass
class Counts:
    """Instructions per warp: one main-loop iteration, one tile's epilogue, the rest (once
    per block). Every instruction counts once (both sides of a branch: an upper bound
    within a loop body), times the ``@trips`` of the annotated loops around it (an
    unannotated loop counts once): inside the main loop, the loops nested in it; elsewhere,
    every loop but the main and the tile loop (whose trips the tile count and the FLOP
    rule give). Main-loop instructions from a ``@per_tile`` line (their own or a call site
    they were inlined at: work behind a branch taken on one k step of each tile) count
    with the epilogue, once per tile; those from a ``@cold`` line count 0."""
    main: float
    epilogue: float
    rest: float


def instruction_counts(code: sass.Code, sizes: dict) -> Counts:
    main, tile = code.main_loop, code.tile_loop
    trips = {}
    for lp in code.loops:
        if lp is main or lp is tile:
            continue
        t = loop_trips(lp, sizes)
        if t is not None:
            trips[id(lp)] = max(t, 0.0)
    annotated = [lp for lp in code.loops if id(lp) in trips]
    counts = Counts(0.0, 0.0, 0.0)
    for ins in code.instrs:
        if cold(ins, sizes):
            continue
        in_main = main is not None and _contains(main, ins.pc)
        w = 1.0
        for lp in annotated:
            if _contains(lp, ins.pc) and (not in_main or _strictly_inside(lp, main)):
                w *= trips[id(lp)]
        if in_main and per_tile(ins):
            counts.epilogue += w
        elif in_main:
            counts.main += w
        elif main is not None and (tile is None or _contains(tile, ins.pc)):
            counts.epilogue += w
        else:
            counts.rest += w
    return counts


def aux_instruction_count(code: sass.Code, sizes: dict) -> float:
    """Instructions per warp of one block of a kernel without a main loop: each once, times
    the ``@trips`` of the annotated loops around it (an unannotated loop counts once),
    none from a ``@cold`` line."""
    trips = {}
    for lp in code.loops:
        t = loop_trips(lp, sizes)
        if t is not None:
            trips[id(lp)] = max(t, 0.0)
    annotated = [lp for lp in code.loops if id(lp) in trips]
    total = 0.0
    for ins in code.instrs:
        if cold(ins, sizes):
            continue
        w = 1.0
        for lp in annotated:
            if _contains(lp, ins.pc):
                w *= trips[id(lp)]
        total += w
    return total


def epilogue_per_tile(code: sass.Code, sizes: dict) -> float:
    """Instructions per warp of one tile's epilogue (see :class:`Counts`)."""
    return instruction_counts(code, sizes).epilogue if code.main is not None else 0.0


def kernel_time(gpu: hw.Gpu, comp: Compiled, work: Work, sizes: dict) -> KernelTime:
    code = comp.code
    warps = max(1, comp.threads // 32)
    per_sm_blocks = math.ceil(work.programs / gpu.sms)
    issue_per_sm = gpu.issue_rate / gpu.sms
    has_main = code.main is not None and work.tile_flops > 0
    kind = tensor_kind(code) if has_main else None
    if not has_main:
        # an aux kernel: its instructions once per block, times the @trips of the
        # annotated loops around them (an unannotated loop counts once)
        rest = aux_instruction_count(code, sizes)
        iters, epi = 0.0, rest
        main_w, epi_w = 0.0, rest
        insts = rest
    else:
        per_iter = code.main.mma_flops_per_warp if kind else code.main.fma_flops_per_warp
        iters = (work.tile_flops / warps) / per_iter if per_iter > 0 else 1.0
        n = instruction_counts(code, sizes)
        epi = n.epilogue
        main_w = n.rest + work.tiles * iters * n.main
        epi_w = work.tiles * epi
        insts = main_w + epi_w
    tensor_s = 0.0
    if kind is not None:
        tensor_s = per_sm_blocks * work.tiles * work.tile_flops / (
            gpu.tensor_flops(kind) / gpu.sms)
    memory_s = work.bytes / gpu.hbm_bytes
    issue_main_s = per_sm_blocks * warps * main_w / issue_per_sm
    issue_epi_s = per_sm_blocks * warps * epi_w / issue_per_sm
    serial = comp.blocks_per_sm < 2 and not comp.warp_specialized and has_main
    if serial:
        compute = max(tensor_s, issue_main_s) + issue_epi_s
        time_s = max(compute, memory_s)
        bound = ("memory" if memory_s >= compute else
                 "tensor+epilogue" if tensor_s >= issue_main_s else "issue")
    else:
        parts = {"tensor": tensor_s, "memory": memory_s, "issue": issue_main_s + issue_epi_s}
        bound = max(parts, key=parts.get)
        time_s = parts[bound]
    return KernelTime(tensor_s, memory_s, issue_main_s, issue_epi_s,
                      time_s + hw.DEVICE_LAUNCH_GAP_S, bound, insts, iters, epi)


def aten_time(gpu: hw.Gpu, op) -> Tuple[float, str]:
    mem = op.bytes / gpu.hbm_bytes
    if op.flops:
        rate = gpu.fp32_flops if op.dtype in ("float32", "float64") else gpu.matmul_flops
        t = op.flops / rate
        return max(t, mem) + hw.DEVICE_LAUNCH_GAP_S, ("tensor" if t >= mem else "memory")
    return mem + hw.DEVICE_LAUNCH_GAP_S, "memory"


HOST_COST = {"triton_launches": hw.HOST_TRITON_LAUNCH_S,
             "aten_kernel_ops": hw.HOST_ATEN_KERNEL_OP_S,
             "aten_meta_ops": hw.HOST_ATEN_META_OP_S,
             "cuda_launches": hw.HOST_CUDA_LAUNCH_S,
             "custom_ops": hw.HOST_CUSTOM_OP_S}


def host_seconds(events: Dict[str, int]) -> float:
    return sum(HOST_COST[k] * v for k, v in events.items())


def predict(trace, resolve: Callable, gpu: hw.Gpu = hw.H200) -> dict:
    """Predicted times of a traced step. ``resolve(op)`` gives (Compiled, Work, sizes)
    for a kernel launch record of the trace."""
    device = {"fwd": 0.0, "bwd": 0.0}
    per_kernel: Dict[str, dict] = {}
    for op in trace.ops:
        if op.kind == "aten":
            t, bound = aten_time(gpu, op)
            key = f"aten.{op.name}" + (" (GEMM)" if op.flops else "")
            flops = op.flops
        else:
            comp, work, sizes = resolve(op)
            kt = kernel_time(gpu, comp, work, sizes)
            t, bound = kt.time_s, kt.bound
            key = op.name
            flops = work.programs * work.tiles * work.tile_flops
        device[op.phase] += t
        agg = per_kernel.setdefault(f"{op.phase}:{key}", dict(
            phase=op.phase, name=key, kind=op.kind, launches=0, ms=0.0, flops=0.0,
            bounds={}))
        agg["launches"] += 1
        agg["ms"] += t * 1e3
        agg["flops"] += flops
        agg["bounds"][bound] = agg["bounds"].get(bound, 0) + 1
    host = {ph: host_seconds(ev) for ph, ev in trace.host_events.items()}
    synced = {ph: any(s.phase == ph for s in trace.syncs) for ph in ("fwd", "bwd")}
    phase = {}
    for ph in ("fwd", "bwd"):
        phase[ph] = device[ph] + host[ph] if synced[ph] else max(device[ph], host[ph])
    total = phase["fwd"] + phase["bwd"]
    return dict(device_ms={k: v * 1e3 for k, v in device.items()},
                host_ms={k: v * 1e3 for k, v in host.items()},
                predicted_ms=dict(fwd=phase["fwd"] * 1e3, bwd=phase["bwd"] * 1e3,
                                  total=total * 1e3),
                kernels=sorted(per_kernel.values(), key=lambda a: -a["ms"]))
