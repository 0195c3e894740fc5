"""Command line of the benchmark: ``arcface-kernels bench [--preset cpu|gpu|smoke] [...]``
(in a checkout also ``python -m bench``).

Writes, under ``--out`` (default ./arcface-bench/ in the current directory; never into
the package or the checkout unless --out names it), for a run tagged TAG:
  TAG.csv    one row per (shape, provider, mode): time, quantiles, peak memory,
             TFLOP/s, ratios to the reference, or why the provider was skipped
  TAG_*.png  time and memory against C per provider (groups with >= 2 values of C)
  TAG.json   date, machine, torch / triton versions, git commit, matmul rate, command
  TAG.md     the summary tables (the same table is printed last)

Presets (explicit options override them):
  cpu    the CPU headline: N=1024, D=128, fp32, C from 8192 to 65536, fwd+bwd, torch's
         default thread count (add --busy K to time it next to K competing processes)
  gpu    N=8192 C=262144 D=512 and N=1024 C=128K..1M D=512, bf16, fwd+bwd
  smoke  tiny shapes, every mode, one round (seconds; for tests and sanity checks)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from . import harness
from .harness import MODES, run_sweep
from .plots import plot_results
from .providers import LOSS_MODES, Problem, all_providers, dtype_name, parse_dtype, \
    select_providers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = "arcface-bench"

PRESETS: Dict[str, dict] = {
    "cpu": dict(device="cpu", dtype="fp32", shapes=[(1024, c, 128) for c in
                                                    (8192, 16384, 32768, 65536)],
                modes=["full"], rounds=3, min_time=0.5, threads=0),
    "gpu": dict(device="cuda", dtype="bf16",
                shapes=[(8192, 262144, 512)] + [(1024, c, 512) for c in
                                                (131072, 262144, 524288, 1048576)],
                modes=["full"], rounds=1, min_time=0.5),
    "smoke": dict(device="auto", dtype="fp32", shapes=[(64, 256, 32), (64, 512, 32)],
                  modes=list(MODES), rounds=1, min_time=0.01),
}

# Targets of the CPU headline (README "Results"): time and peak-memory ratios to the
# reference at N=1024, C=65536, D=128 fp32, forward+backward.
HEADLINE_CPU = dict(device="cpu", dtype="fp32", N=1024, C=65536, D=128, mode="full",
                    loss="arcface")
TARGETS = {"chunked": (1.0, 0.10), "cpp": (0.5, 0.05)}


def _ints(text: str, name: str) -> List[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise SystemExit(f"--{name} must be a comma-separated list of ints, got {text!r}")
    if not vals or min(vals) < 1:
        raise SystemExit(f"--{name} must hold positive ints, got {text!r}")
    return vals


def _shapes(text: str) -> List[tuple]:
    out = []
    for item in text.replace(" ", "").split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes takes NxCxD items separated by commas, got {item!r}")
        out.append(tuple(int(p) for p in parts))
    return out


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="defaults for a standard run (cpu when --device is cpu or no "
                         "GPU is present, gpu otherwise)")
    ap.add_argument("--device", help="cpu, cuda or auto")
    ap.add_argument("--dtype", help="fp32, bf16, fp16 or fp64")
    ap.add_argument("--shapes", help="NxCxD,NxCxD,... (overrides --N/--C/--D)")
    ap.add_argument("--N", help="comma list of batch sizes (swept with --C, --D)")
    ap.add_argument("--C", help="comma list of class counts")
    ap.add_argument("--D", help="comma list of embedding sizes")
    ap.add_argument("--providers", default="all",
                    help=f"comma list among {list(all_providers())} or 'all'; a "
                         "backend may carry a chunk size: chunked:1024")
    ap.add_argument("--modes", help=f"comma list among {list(MODES)}")
    ap.add_argument("--loss", default="arcface", choices=list(LOSS_MODES),
                    help="loss of our backends and the reference (peers run in their own "
                         "mode: cce/liger linear_ce, pml arcface)")
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds")
    ap.add_argument("--min-time", type=float, help="seconds per timing block on the CPU")
    ap.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up (CUDA)")
    ap.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition (CUDA)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="results folder (relative to the current directory)")
    ap.add_argument("--tag", help="file name stem (default DEVICE_DTYPE)")
    ap.add_argument("--append", action="store_true",
                    help="add this run's rows to an existing TAG.csv (the summary, plots "
                         "and ratios are then made from all rows)")
    ap.add_argument("--time-budget", type=float,
                    help="seconds; providers not yet started by then are skipped")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-matmul", action="store_true", help="skip the matmul rate")
    ap.add_argument("--threads", type=int,
                    help="torch intra-op threads; 0 = torch's default (one per core)")
    ap.add_argument("--busy", type=int, default=0, metavar="K",
                    help="start K busy-looping processes that compete for the cores for "
                         "the whole run (every provider, the reference included, is timed "
                         "under the same load, interleaved): how a kernel holds up next to "
                         "data-loader workers")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--list", action="store_true",
                    help="list the providers and whether each runs here, then exit")
    return ap


def resolve_args(args: argparse.Namespace) -> dict:
    """Merge a preset with explicit options into a run plan."""
    device = args.device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    plan = dict(PRESETS[preset])
    if plan["device"] == "auto" or args.device:
        plan["device"] = device
    if plan["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda (or --preset gpu) needs a CUDA device; none here")
    if plan["device"] not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu, cuda or auto, got {plan['device']!r}")
    if args.dtype:
        plan["dtype"] = args.dtype
    try:
        plan["dtype"] = parse_dtype(plan["dtype"])
    except ValueError as e:
        raise SystemExit(f"--dtype: {e}")
    if args.shapes:
        plan["shapes"] = _shapes(args.shapes)
    elif args.N or args.C or args.D:
        ns = _ints(args.N, "N") if args.N else sorted({s[0] for s in plan["shapes"]})
        cs = _ints(args.C, "C") if args.C else sorted({s[1] for s in plan["shapes"]})
        ds = _ints(args.D, "D") if args.D else sorted({s[2] for s in plan["shapes"]})
        plan["shapes"] = list(itertools.product(ns, cs, ds))
    if args.modes:
        modes = [m for m in args.modes.replace(" ", "").split(",") if m]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise SystemExit(f"--modes must be among {list(MODES)}, got {args.modes!r}")
        plan["modes"] = modes
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
        plan["rounds"] = args.rounds
    if args.min_time is not None:
        if args.min_time <= 0:
            raise SystemExit(f"--min-time must be > 0, got {args.min_time}")
        plan["min_time"] = args.min_time
    try:
        plan["providers"] = select_providers(
            [p for p in args.providers.replace(" ", "").split(",") if p])
    except ValueError as e:
        raise SystemExit(f"--providers: {e}")
    plan["preset"] = preset
    plan["tag"] = args.tag or f"{plan['device']}_{dtype_name(plan['dtype'])}"
    return plan


def _git(*cmd: str) -> str:
    if not os.path.exists(os.path.join(REPO, ".git")):  # an installed copy, not a checkout
        return ""
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def collect_meta(plan: dict, matmul: Optional[float]) -> dict:
    """Date, machine, versions, git commit and run plan of this benchmark run."""
    import arcface_kernels as ak
    meta = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.node(), "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "device": plan["device"], "dtype": dtype_name(plan["dtype"]),
        "shapes": [list(s) for s in plan["shapes"]], "modes": plan["modes"],
        "rounds": plan["rounds"], "preset": plan["preset"],
        "matmul_tflops": matmul,
        "matmul_kind": ("bf16 8192^3" if plan["device"] == "cuda" else "fp32 2048^3"),
        "backends": ak.backend_status(), "command": " ".join(sys.argv),
    }
    from importlib import metadata
    from .providers import PEERS
    meta["peers"] = {}
    for cls in PEERS:
        try:
            meta["peers"][cls.pip_name] = metadata.version(cls.pip_name)
        except metadata.PackageNotFoundError:
            meta["peers"][cls.pip_name] = None
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if plan["device"] == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["cuda"] = torch.version.cuda
    return meta


def _target_note(r: dict) -> str:
    h = HEADLINE_CPU
    if (r["provider"] not in TARGETS or r["status"] != "ok"
            or any(str(r[k]) != str(v) for k, v in h.items())):
        return ""
    t_max, m_max = TARGETS[r["provider"]]
    tv, mv = r.get("time_vs_reference", ""), r.get("mem_vs_reference", "")
    if tv == "" or mv == "":
        return "target: no reference"
    ok_t, ok_m = float(tv) <= t_max, float(mv) <= m_max
    return (f"time {'met' if ok_t else 'MISSED'} (<= {t_max:g}x), memory "
            f"{'met' if ok_m else 'MISSED'} (<= {m_max:.0%})")


def _num(v, fmt: str) -> str:
    return "" if v == "" or v is None else format(float(v), fmt)


def summary_markdown(rows: Sequence[dict], meta: Optional[dict] = None) -> str:
    """Markdown tables, one per (shape, dtype, mode): each provider's time, ratio to the
    reference, extra peak memory and TFLOP/s; skipped providers listed below."""
    out = []
    if meta:
        out.append(f"Measured {meta['date_utc']} UTC on {meta.get('gpu') or meta['cpu']} "
                   f"(torch threads: {meta['torch_threads']}"
                   + (f"; {meta['busy_processes']} busy process(es) competing"
                      if meta.get("busy_processes") else "")
                   + f"), torch {meta['torch']}, commit "
                   f"{meta['git_commit'][:10]}{' (dirty)' if meta['git_dirty'] else ''}; "
                   f"matmul rate {_num(meta['matmul_tflops'], '.3g')} TFLOP/s "
                   f"({meta['matmul_kind']}).\n")
    keys = []
    for r in rows:
        k = (r["device"], r["dtype"], int(r["N"]), int(r["C"]), int(r["D"]), r["mode"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        dev, dtype, n, c, d, mode = k
        rs = [r for r in rows if (r["device"], r["dtype"], int(r["N"]), int(r["C"]),
                                  int(r["D"]), r["mode"]) == k]
        out.append(f"**{'fwd+bwd' if mode == 'full' else mode}, N={n}, C={c}, D={d}, "
                   f"{dtype}, {dev}**\n")
        out.append("| provider | loss | time ms (q20-q80) | x reference | extra peak MiB "
                   "| of which workspace MiB | x reference | TFLOP/s | of matmul | note |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        skipped = []
        for r in rs:
            if r["status"] != "ok":
                skipped.append(f"- {r['provider']}: {r['status']}: {r['message']}")
                continue
            t = (f"{_num(r['time_ms'], '.4g')} ({_num(r['time_q20_ms'], '.4g')}-"
                 f"{_num(r['time_q80_ms'], '.4g')})" if r["time_ms"] != "" else "")
            out.append(
                f"| {r['provider']} | {r['loss']} | {t} | {_num(r['time_vs_reference'], '.2f')}"
                f" | {_num(r['peak_mem_mib'], '.1f')} | {_num(r['workspace_mib'], '.1f')} | "
                f"{_num(r['mem_vs_reference'], '.3f')} | {_num(r['tflops'], '.3g')} | "
                f"{_num(r['frac_of_matmul'], '.1%')} | {_target_note(r)} |")
        if skipped:
            out.append("\nNot measured:\n" + "\n".join(sorted(set(skipped))))
        out.append("")
    return "\n".join(out)


def list_providers(device: torch.device, dtype: torch.dtype) -> str:
    """One line per provider: whether it runs on (device, dtype) here, and why not."""
    p = Problem(8, 16, 8, dtype, device)
    lines = []
    for name, prov in all_providers().items():
        reason = prov.skip_reason(p)
        lines.append(f"{name:10s} {'ok' if reason is None else 'skip: ' + reason}"
                     f"   [{prov.description}]")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m bench") -> int:
    """Run the benchmark described by the command line; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    plan = resolve_args(args)
    device = torch.device(plan["device"])
    threads = args.threads if args.threads is not None else plan.get("threads", 0)
    if threads < 0:
        raise SystemExit(f"--threads must be >= 0, got {threads}")
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    if args.list:
        print(list_providers(device, plan["dtype"]))
        return 0
    if args.busy < 0:
        raise SystemExit(f"--busy must be >= 0, got {args.busy}")
    with busy_processes(args.busy):
        return _run(args, plan, device)


@contextlib.contextmanager
def busy_processes(k: int) -> Iterator[None]:
    """K child processes that spin on a core each until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(k)]
    try:
        if procs:
            print(f"bench: {k} busy process(es) competing for the cores", flush=True)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _run(args: argparse.Namespace, plan: dict, device: torch.device) -> int:
    os.makedirs(args.out, exist_ok=True)
    tag = plan["tag"]
    csv_path = os.path.join(args.out, f"{tag}.csv")
    print(f"bench: preset {plan['preset']}, {device.type} {dtype_name(plan['dtype'])}, "
          f"{len(plan['shapes'])} shape(s), providers "
          f"{[p.name for p in plan['providers']]}, modes {plan['modes']} -> {csv_path}",
          flush=True)
    old = harness.read_csv(csv_path) if args.append and os.path.exists(csv_path) else []
    matmul = None if args.no_matmul else harness.matmul_tflops(device)
    if matmul is None:  # appending: keep the rate measured by the first run
        matmul = next((r["matmul_tflops"] for r in old if r["matmul_tflops"] != ""), None)
    if matmul:
        print(f"bench: matmul rate {matmul:.3g} TFLOP/s", flush=True)
    problems = [Problem(n, c, d, plan["dtype"], device, args.loss)
                for n, c, d in plan["shapes"]]
    rows = run_sweep(problems, plan["providers"], plan["modes"], csv_path=csv_path,
                     rounds=plan["rounds"], min_time_s=plan["min_time"],
                     memory=not args.no_memory, matmul=matmul, progress=not args.quiet,
                     warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, append=bool(old),
                     time_budget_s=args.time_budget)
    if old:  # ratios across both runs, then the whole file rewritten
        rows = old + rows
        harness.add_reference_ratios(rows)
        harness.write_csv(csv_path, rows)
    meta = collect_meta(plan, matmul)
    meta["busy_processes"] = args.busy
    pngs = []
    if not args.no_plot:
        if importlib.util.find_spec("matplotlib") is None:
            print('bench: matplotlib is not installed, so no plots '
                  '(pip install "arcface-kernels[bench]" adds it)', flush=True)
        else:
            pngs = plot_results(rows, args.out, tag)
    meta["files"] = [os.path.basename(p) for p in [csv_path, *pngs]]
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    md = summary_markdown(rows, meta)
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        f.write(md + "\n")
    for p in pngs:
        print(f"bench: wrote {p}")
    print(f"bench: wrote {csv_path}, {tag}.json, {tag}.md\n")
    print(md)
    return 0
