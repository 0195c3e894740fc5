"""``python -m bench static``: the compiled kernels of both GPU backends and a cost model of
a training step, without a GPU.

    python -m bench static [--arch sm_90a,sm_80] [--dtypes bf16,fp16,fp32]
                           [--backends triton,cpp] [--out DIR] [--quick]
                           [--cuda-build DIR] [--measured FILE]

writes ``DIR/TAG.md`` (the readable report) and ``DIR/TAG.json`` (TAG: ``--tag``, default
"static"); DIR defaults to ``<tmp>/arcface-kernels-static``, outside the checkout.
``--quick`` (what CI runs) is sm_90a and bf16 only. The committed report for the current
code is ``bench/results/static_sm90a.{md,json}``
(``python -m bench static --out bench/results --tag static_sm90a``); its ``sources_sha``
must match the checkout's (tests/test_static.py checks it).

How (details in each module):

* :mod:`.trace` runs one step (``arcface_loss`` forward + backward) of each backend on
  fake CUDA tensors with the kernels stubbed, and counts allocations (peak extra bytes),
  launches, host syncs and host work; the cpp backend once per arch (its host code picks
  its kernels by the device's compute capability: the fused ``*_sm90_tma_kernel`` on
  sm_90, ``*_sm90_kernel`` there with a Partial FC index, ``*_sm80_kernel`` on sm_80),
  the shapes' figures from the sm_90a trace;
* :mod:`.kernels` compiles every Triton launch of those steps with ``triton.compile`` for
  sm_90a and sm_80, builds the cpp extension's CUDA kernels with its own FORCE_CUDA build,
  and says how much work each launch is (:data:`.kernels.SPECS`);
* :mod:`.sass` disassembles them (cuobjdump / nvdisasm from the triton wheel): registers,
  spills, shared memory, occupancy, instruction mix, the main loop and the epilogue;
* :mod:`.model` turns that into predicted times (ceilings in :mod:`.hardware`, with their
  sources); :mod:`.report` writes the JSON and the Markdown;
* ``bench/gpu_check.sh`` measures the same steps on a GPU (:mod:`.calibrate`) so that the
  report shows measured next to predicted.

JSON schema (``schema``: "arcface-kernels static report, v1"):

* ``meta``: date_utc, git_commit, git_dirty, sources_sha, torch, triton, python, machine, command,
  arches, dtypes, backends, prediction (always true), triton_options (the triton
  backend's switches in effect: autotune, fp32_precision, workspace_bytes, dw_fp32).
* ``gpu``: the modelled GPU: name, sms, matmul_tflops, datasheet_tflops, hbm_tb_s,
  clock_ghz, issue_rate_per_s, hmma_fraction, device_launch_gap_us.
* ``goals``: peak_fraction, extra_bytes, host_syncs, llm_head_tflops, peer.
* ``kernels``: one row per compiled kernel, arch and dtype: backend, name, role
  (fwd_main, bwd_main or aux), arch, dtype, regs, spill_bytes (spill_store_bytes,
  spill_load_bytes), stack_bytes, smem_bytes (smem_static_bytes, smem_dynamic_bytes),
  threads, blocks_per_sm, occupancy_limiter, instructions (static total), tensor_core
  {hgmma, hmma}, ldsm, global_access {ldg_128, ldg_narrow, stg_128, stg_narrow,
  ldgsts_128, ldgsts_narrow, tma_load, tma_store}, opcodes {OPCODE: count},
  main_loop_insts_per_iter, main_loop_flops_per_warp, main_loop_iters_per_tile (sm_90a),
  epilogue_insts_per_tile, loops, config (Triton: the constexprs; cpp: threads, and for
  the fused kernels the CTA tile bm, bn, bk and the dynamic shared memory smem), uses
  (the shapes that launch it; cpp kernels: on that arch's device).
* ``shapes``: one row per backend and shape (bf16): backend, N, C, D, dtype, loss
  ("arcface" or "linear_ce"), extra_bytes (peak beyond inputs, outputs and gradients),
  peak_bytes, grad_bytes, launches {fwd, bwd, total}, host_syncs, sync_sites [{phase,
  what, where}], host_events {phase: {event: count}}, host_ms {fwd, bwd, total},
  device_ms {fwd, bwd, total}, predicted_ms {fwd, bwd, total}, predicted_peak_fraction
  (8 N C D / predicted total / matmul rate), predicted_tflops, kernels (the largest
  predicted contributions: phase, name, kind, launches, ms, flops, bounds), and
  ``measured`` when a calibration file from a GPU run is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional, Sequence

DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "arcface-kernels-static")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench static", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90a,sm_80", help="comma list among sm_90a, sm_80")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32",
                    help="kernel dtypes (the shapes are modelled in bf16)")
    ap.add_argument("--backends", default="triton,cpp", help="comma list: triton, cpp")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    ap.add_argument("--tag", default="static", help="file name stem (default: static)")
    ap.add_argument("--quick", action="store_true", help="sm_90a and bf16 only (CI)")
    ap.add_argument("--cuda-build", default=None,
                    help="build folder of the extension's FORCE_CUDA build (reused when up "
                         "to date; default: a cache folder)")
    ap.add_argument("--measured", default=None,
                    help="calibration JSON of a GPU run (bench/static/calibrate.py) to show "
                         "beside the predictions")
    return ap


def _list(text: str, allowed, name: str):
    vals = [v for v in text.replace(" ", "").split(",") if v]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise SystemExit(f"--{name} must be a comma list among {sorted(allowed)}, got {text!r}")
    return vals


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("python -m bench static compiles real kernels: unset TRITON_INTERPRET")
    from . import report as R
    from .trace import cache_dir
    arches = ["sm_90a"] if args.quick else _list(args.arch, ("sm_90a", "sm_80"), "arch")
    dtypes = ["bf16"] if args.quick else _list(args.dtypes, R.DTYPES, "dtypes")
    if "bf16" not in dtypes:
        dtypes.append("bf16")   # the shapes are modelled in bf16
    if "sm_90a" not in arches:
        arches.insert(0, "sm_90a")   # the model is for sm_90a
    backends = _list(args.backends, ("triton", "cpp"), "backends")
    measured = None
    if args.measured:
        with open(args.measured) as f:
            measured = json.load(f)
    rep = R.Report(backends, arches, dtypes,
                   args.cuda_build or os.path.join(cache_dir(), "cuda_build"), measured)
    rep.run_traces()
    rep.compile_all()
    data = rep.to_json()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    md = R.to_markdown(data)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"\nstatic: wrote {args.out}/{args.tag}.md and {args.tag}.json", file=sys.stderr)
    return 0
