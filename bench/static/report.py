"""Assembling the static report: traces, compiled kernels, the model, JSON and Markdown.

See :mod:`bench.static` for the command line and the JSON schema.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import torch

from . import hardware as hw
from . import kernels as K
from . import model as M
from . import sass
from .trace import trace_arcface

SCHEMA = "arcface-kernels static report, v1"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: The headline shapes (ArcFace, bf16) and the LLM-head comparison shape (plain linear
#: cross-entropy: normalize=False, s=1, no margin).
SHAPES = [(8192, 262144, 512, "arcface"), (1024, 1048576, 512, "arcface"),
          (8192, 131072, 4096, "linear_ce")]
LOSS_KWARGS = {"arcface": {}, "linear_ce": dict(normalize=False, s=1.0, m2=0.0)}
GOALS = dict(peak_fraction=0.60, extra_bytes=64 << 20, host_syncs=0,
             llm_head_tflops=hw.PEER_LLM_HEAD["tflops"])


#: The files a static report depends on: the kernels, their launch paths, the model.
SOURCES = ["triton_kernels/*.py", "csrc/*.h", "csrc/ops.cpp", "csrc/cuda/*",
           "arcface_kernels/loss.py", "arcface_kernels/_ops.py", "arcface_kernels/backends.py",
           "arcface_kernels/_cpp.py", "arcface_kernels/_config.py",
           "arcface_kernels/_checks.py", "arcface_kernels/_triton.py", "bench/static/*.py"]


def sources_sha() -> str:
    """sha1 of the report's SOURCES (paths and contents): a committed report whose
    sources_sha differs from the checkout's is stale."""
    import glob
    import hashlib
    h = hashlib.sha1()
    files = sorted({os.path.relpath(f, K.REPO) for pat in SOURCES
                    for f in glob.glob(os.path.join(K.REPO, pat)) if os.path.isfile(f)})
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(K.REPO, rel), "rb") as f:
            h.update(f.read().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"static: {msg}", file=sys.stderr, flush=True)


def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=K.REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class Report:
    """Everything of one run; :meth:`to_json` is the report."""

    def __init__(self, backends: List[str], arches: List[str], dtypes: List[str],
                 cuda_build: str, measured: Optional[dict] = None):
        self.backends, self.arches, self.dtypes = backends, arches, dtypes
        self.cuda_build = cuda_build
        self.measured = measured
        self.traces: Dict[tuple, object] = {}          # on the modelled GPU (sm_90a)
        # the cpp backend on the other arches' GPUs (its host code picks its kernels by
        # the device's compute capability): (arch, dtype, N, C, D, loss) -> trace
        self.arch_traces: Dict[tuple, object] = {}
        self.triton_variants: Dict[str, dict] = {}     # key -> launch (+ uses)
        self.triton_code: Dict[Tuple[str, str], tuple] = {}
        self.cuda_codes: Dict[str, Dict[str, sass.Code]] = {}
        self.cuda_names: Dict[str, Dict[str, str]] = {}

    # ------------------------------------------------------------------------ tracing
    def run_traces(self) -> None:
        for backend in self.backends:
            for dt in self.dtypes:
                for n, c, d, loss in SHAPES:
                    if loss == "linear_ce" and dt != "bf16":
                        continue
                    _log(f"tracing {backend} {dt} N={n} C={c} D={d} {loss}")
                    tr = trace_arcface(backend, n, c, d, DTYPES[dt], gpu=hw.H200,
                                       **LOSS_KWARGS[loss])
                    self.traces[(backend, dt, n, c, d, loss)] = tr
                    # the cpp host code picks its kernels by the device's capability:
                    # traced again on each other arch's GPU (Triton's launches do not
                    # depend on the arch: compiled for each from the one trace)
                    for arch in self.arches:
                        if backend != "cpp" or arch == hw.H200.arch:
                            continue
                        gpu = hw.BY_ARCH[arch]
                        _log(f"tracing cpp {dt} N={n} C={c} D={d} {loss} on {arch} "
                             f"(capability {gpu.capability}, {gpu.sms} SMs)")
                        self.arch_traces[(arch, dt, n, c, d, loss)] = trace_arcface(
                            backend, n, c, d, DTYPES[dt], gpu=gpu, **LOSS_KWARGS[loss])
                    for l in tr.triton_launches:
                        key = K.triton_variant_key(l)
                        v = self.triton_variants.setdefault(key, dict(l, uses=[]))
                        tag = f"N={n} C={c} D={d} {loss}"
                        if tag not in v["uses"]:
                            v["uses"].append(tag)

    # ---------------------------------------------------------------------- compiling
    def compile_all(self) -> None:
        for key, launch in self.triton_variants.items():
            for arch in self.arches:
                _log(f"compiling triton {launch['name']} ({launch['dtype']}) for {arch}")
                cubin, md = K.compile_triton(launch, arch)
                codes = sass.analyze_cubin(cubin, arch)
                code = codes.get(md["name"]) or next(iter(codes.values()))
                self.triton_code[(key, arch)] = (code, md)
        if "cpp" in self.backends:
            _log(f"building the extension's CUDA kernels (sm_80, sm_90a) in {self.cuda_build}")
            obj = K.cuda_build(self.cuda_build, log=_log)
            for arch, cubin in sass.cubins(obj).items():
                if arch in self.arches:
                    self.cuda_codes[arch] = sass.analyze_cubin(cubin, arch)
                    self.cuda_names[arch] = sass.demangle(list(self.cuda_codes[arch]))

    def compiled_triton(self, launch: dict, arch: str) -> M.Compiled:
        code, md = self.triton_code[(K.triton_variant_key(launch), arch)]
        threads = 32 * md["num_warps"]
        smem = md["shared"] + code.static_smem
        blocks, lim = sass.blocks_per_sm(hw.BY_ARCH[arch], code.regs, threads, smem)
        return M.Compiled(code, threads, smem, blocks, lim)

    def compiled_cuda(self, rec: dict, arch: str) -> M.Compiled:
        code = K.cuda_function(self.cuda_codes[arch], self.cuda_names[arch], rec["kernel"],
                               rec["dtype"])
        if code is None:
            raise KeyError(f"no {rec['kernel']}<{rec['dtype']}> in the {arch} cubin")
        # static shared memory from the cubin, plus the launch's dynamic shared memory
        # (the fused kernels' pipeline stages: the launch record's sizes["smem"])
        smem = code.static_smem + int(rec.get("sizes", {}).get("smem", 0))
        blocks, lim = sass.blocks_per_sm(hw.BY_ARCH[arch], code.regs, rec["threads"], smem)
        return M.Compiled(code, rec["threads"], smem, blocks, lim)

    def resolve(self, backend: str, arch: str = "sm_90a"):
        def res(op):
            d = op.detail
            spec = K.spec_of(backend, op.name)
            if op.kind == "triton":
                return self.compiled_triton(d, arch), spec.work(d), K.triton_sizes(d)
            return self.compiled_cuda(d, arch), spec.work(d), dict(d["sizes"])
        return res

    # ------------------------------------------------------------------------ tables
    def kernel_rows(self) -> List[dict]:
        rows = []
        for key, launch in self.triton_variants.items():
            spec = K.spec_of("triton", launch["name"])
            work = spec.work(launch)
            sizes = K.triton_sizes(launch)
            for arch in self.arches:
                comp = self.compiled_triton(launch, arch)
                meta = {k: v for k, v in launch["meta"].items()
                        if k.startswith("BLOCK") or k in ("num_warps", "num_stages", "K",
                                                          "NORMALIZE", "DOT_MODE")}
                rows.append(self._kernel_row("triton", launch["name"], spec.role, arch,
                                             _dt_name(launch["dtype"]), comp, work, sizes,
                                             dict(config=meta, uses=launch["uses"])))
        # cpp: per arch, the launches of that arch's traces (the host code launches the
        # fused sm_90a kernels on sm_90 and the sm_80 ones below: each is compiled and
        # shown for the arch whose device launches it)
        variants: Dict[tuple, dict] = {}
        for arch in self.arches:
            for key, tr in self.cpp_traces(arch).items():
                n, c, d, loss = key[1:]
                for op in tr.ops:
                    if op.kind == "cuda":
                        rec = op.detail
                        v = variants.setdefault(
                            (arch, rec["kernel"], rec["dtype"], rec["threads"]),
                            dict(rec=rec, uses=[]))
                        tag = f"N={n} C={c} D={d} {loss}"
                        if tag not in v["uses"]:
                            v["uses"].append(tag)
        for (arch, kernel, dtype, threads), v in variants.items():
            spec = K.spec_of("cpp", kernel)
            rec = v["rec"]
            comp = self.compiled_cuda(rec, arch)
            config = dict(threads=threads)
            config.update({k: rec["sizes"][k] for k in ("bm", "bn", "bk", "smem")
                           if k in rec["sizes"]})
            rows.append(self._kernel_row(
                "cpp", kernel, spec.role, arch, _dt_name(dtype), comp, spec.work(rec),
                dict(rec["sizes"]), dict(config=config, uses=v["uses"])))
        return rows

    def cpp_traces(self, arch: str) -> Dict[tuple, object]:
        """The cpp backend's traces on ``arch``'s GPU: (dtype, N, C, D, loss) -> trace."""
        if arch == hw.H200.arch:
            return {k[1:]: tr for k, tr in self.traces.items() if k[0] == "cpp"}
        return {k[1:]: tr for k, tr in self.arch_traces.items() if k[0] == arch}

    def _kernel_row(self, backend, name, role, arch, dtype, comp: M.Compiled, work: K.Work,
                    sizes: dict, extra: dict) -> dict:
        code = comp.code
        main = code.main if role != "aux" else None
        # iterations per tile come from the model, for the modelled GPU's arch only
        kt = M.kernel_time(hw.H200, comp, work, sizes) if arch == hw.H200.arch else None
        base = code.base_counts()
        return dict(
            backend=backend, name=name, role=role, arch=arch, dtype=dtype,
            regs=code.regs, spill_bytes=code.spill_store_bytes + code.spill_load_bytes,
            spill_store_bytes=code.spill_store_bytes, spill_load_bytes=code.spill_load_bytes,
            stack_bytes=code.stack, smem_bytes=comp.smem, smem_static_bytes=code.static_smem,
            smem_dynamic_bytes=comp.smem - code.static_smem, threads=comp.threads,
            blocks_per_sm=comp.blocks_per_sm, occupancy_limiter=comp.limiter,
            instructions=code.size, tensor_core=dict(
                hgmma=base.get("HGMMA", 0), hmma=base.get("HMMA", 0)),
            ldsm=base.get("LDSM", 0),
            global_access={k: v for k, v in code.access.items()
                           if k.startswith(("ldg", "stg", "ldgsts", "tma"))},
            opcodes=dict(sorted(base.items(), key=lambda kv: -kv[1])),
            main_loop_insts_per_iter=round(M.instruction_counts(code, sizes).main, 1)
            if main else None,
            main_loop_flops_per_warp=(main.mma_flops_per_warp or main.fma_flops_per_warp)
            if main else None,
            epilogue_insts_per_tile=round(M.epilogue_per_tile(code, sizes), 1) if main else None,
            main_loop_iters_per_tile=round(kt.iterations_per_tile, 2) if kt and main else None,
            loops=len(code.loops), **extra)

    def shape_rows(self) -> List[dict]:
        rows = []
        for (backend, dt, n, c, d, loss), tr in self.traces.items():
            if dt != "bf16":
                continue
            pred = M.predict(tr, self.resolve(backend))
            total_s = pred["predicted_ms"]["total"] / 1e3
            flops = 8.0 * n * c * d
            syncs = [dict(phase=s.phase, what=s.what, where=s.where) for s in tr.syncs]
            row = dict(
                backend=backend, N=n, C=c, D=d, dtype=dt, loss=loss,
                extra_bytes=tr.extra_bytes, peak_bytes=tr.peak_bytes,
                grad_bytes=tr.grad_bytes,
                launches=dict(fwd=tr.launches("fwd"), bwd=tr.launches("bwd"),
                              total=tr.launches()),
                host_syncs=len(syncs), sync_sites=syncs,
                host_events=tr.host_events,
                host_ms=dict(pred["host_ms"], total=sum(pred["host_ms"].values())),
                device_ms=dict(pred["device_ms"], total=sum(pred["device_ms"].values())),
                predicted_ms=pred["predicted_ms"],
                predicted_peak_fraction=flops / total_s / hw.H200.matmul_flops,
                predicted_tflops=flops / total_s / 1e12,
                kernels=[dict(k, ms=round(k["ms"], 4)) for k in pred["kernels"][:12]],
                trace_wall_s=round(tr.wall_s, 2))
            if self.measured:
                m = _find_measured(self.measured, row)
                if m:
                    row["measured"] = m
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        import triton
        gpu = hw.H200
        return dict(
            schema=SCHEMA,
            meta=dict(date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                      git_commit=_git("rev-parse", "HEAD"), sources_sha=sources_sha(),
                      git_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
                      torch=torch.__version__, triton=triton.__version__,
                      python=platform.python_version(), machine=platform.node(),
                      command=" ".join(sys.argv), arches=self.arches, dtypes=self.dtypes,
                      backends=self.backends, prediction=True,
                      triton_options=_triton_options()),
            gpu=dict(name=gpu.name, sms=gpu.sms, matmul_tflops=gpu.matmul_flops / 1e12,
                     datasheet_tflops=gpu.datasheet_flops / 1e12,
                     hbm_tb_s=gpu.hbm_bytes / 1e12, clock_ghz=gpu.clock_hz / 1e9,
                     issue_rate_per_s=gpu.issue_rate, hmma_fraction=gpu.hmma_fraction,
                     device_launch_gap_us=hw.DEVICE_LAUNCH_GAP_S * 1e6),
            goals=dict(GOALS, peer=hw.PEER_LLM_HEAD),
            kernels=self.kernel_rows(),
            shapes=self.shape_rows())


def _triton_options() -> dict:
    """The triton backend's switches in effect (read once from the environment)."""
    import dataclasses
    from arcface_kernels.triton_kernels.options import OPTIONS
    return dataclasses.asdict(OPTIONS)


def _dt_name(c10: str) -> str:
    return {"BFloat16": "bf16", "Half": "fp16", "Float": "fp32", "bfloat16": "bf16",
            "float16": "fp16", "float32": "fp32", "float64": "fp64"}.get(c10, c10)


def _find_measured(measured: dict, row: dict) -> Optional[dict]:
    for m in measured.get("shapes", []):
        if all(str(m.get(k)) == str(row[k]) for k in ("backend", "N", "C", "D", "dtype", "loss")):
            return m
    return None


# --------------------------------------------------------------------------- markdown
def _mib(b) -> str:
    return f"{b / 2**20:.1f}"


def _measured_kernel_ms(measured: Optional[dict], name: str) -> Optional[float]:
    """Device ms of the measured kernels whose profiler name contains ``name`` (our own
    kernels only: ATen's kernels have library names)."""
    if not measured or name.startswith("aten."):
        return None
    hits = [k["ms"] for k in measured.get("kernels", []) if name in k["name"]]
    return sum(hits) if hits else None


def to_markdown(rep: dict) -> str:
    meta, gpu, goals = rep["meta"], rep["gpu"], rep["goals"]
    has_meas = any("measured" in s for s in rep["shapes"])
    out = [
        "# Static kernel report (predictions, not measurements)",
        "",
        f"Generated {meta['date_utc']} UTC from commit {meta['git_commit'][:10]}"
        f"{' (dirty)' if meta['git_dirty'] else ''} (sources {meta['sources_sha'][:10]}) with torch {meta['torch']}, triton "
        f"{meta['triton']}, without a GPU: `python -m bench static` compiled every kernel "
        f"the two GPU backends launch ({', '.join(meta['arches'])}; "
        f"{', '.join(meta['dtypes'])}) and traced each backend's launch path on fake CUDA "
        "tensors. **Every time and rate below is a prediction of the cost model** "
        "(`bench/static/model.py`) for an "
        f"{gpu['name']}: {gpu['sms']} SMs, tensor-core rate {gpu['matmul_tflops']:.0f} "
        f"TFLOP/s (measured cuBLAS; datasheet {gpu['datasheet_tflops']:.0f}), HBM "
        f"{gpu['hbm_tb_s']:.1f} TB/s, clock {gpu['clock_ghz']:.2f} GHz (implied). Memory, "
        "launches and host syncs are counted from the traced step itself. The cpp "
        "backend's host code picks its kernels by the device (on sm_90 the fused "
        "`*_sm90_tma_kernel`, or `*_sm90_kernel` with a Partial FC index; `*_sm80_kernel` "
        "on sm_80): its kernels are traced and listed per arch.",
        "",
        "## Headline shapes, forward + backward (bf16)",
        "",
        f"Goals: at least {goals['peak_fraction']:.0%} of the matmul rate (8·N·C·D FLOPs), "
        f"at most {_mib(goals['extra_bytes'])} MiB extra, {goals['host_syncs']} host syncs; "
        f"at the LLM-head shape above {goals['llm_head_tflops']:.0f} TFLOP/s "
        f"({goals['peer']['name']}: {goals['peer']['ms']} ms).",
        "",
        "| backend | shape | loss | predicted ms fwd / bwd / total | predicted TFLOP/s | "
        "predicted fraction of matmul rate | extra MiB | launches | host syncs | host ms "
        "(predicted) |" + (" measured ms fwd / bwd / total | measured extra MiB | "
                           "measured syncs | measured / predicted |" if has_meas else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if has_meas else ""),
    ]
    for s in rep["shapes"]:
        p = s["predicted_ms"]
        line = (f"| {s['backend']} | N={s['N']} C={s['C']} D={s['D']} | {s['loss']} | "
                f"{p['fwd']:.2f} / {p['bwd']:.2f} / **{p['total']:.2f}** | "
                f"{s['predicted_tflops']:.0f} | **{s['predicted_peak_fraction']:.2f}** | "
                f"{_mib(s['extra_bytes'])} | {s['launches']['total']} | {s['host_syncs']} | "
                f"{s['host_ms']['total']:.2f} |")
        if has_meas:
            m = s.get("measured") or {}
            mm = m.get("measured_ms")
            if mm:
                line += (f" {mm['fwd']:.2f} / {mm['bwd']:.2f} / **{mm['total']:.2f}** | "
                         f"{_mib(m['extra_bytes'])} | {m['host_syncs']} | "
                         f"{mm['total'] / p['total']:.2f} |")
            else:
                line += f" {m.get('error', 'not measured')} | | | |"
        out.append(line)
    out += ["", "Host syncs found (each stops the host until the GPU catches up; none is "
            "allowed inside a CUDA-graph capture):", ""]
    sites = {}
    for s in rep["shapes"]:
        for y in s["sync_sites"]:
            sites.setdefault((s["backend"], y["what"], y["where"]), 0)
    for (b, what, where) in sorted(sites):
        out.append(f"- {b}: `{what}` at {where}")
    if not sites:
        out.append("- none")
    out += ["", "## Where the predicted time goes (bf16, sm_90a)", ""]
    for s in rep["shapes"]:
        out.append(f"**{s['backend']}, N={s['N']} C={s['C']} D={s['D']} {s['loss']}** "
                   f"(device {s['device_ms']['total']:.2f} ms, host "
                   f"{s['host_ms']['total']:.2f} ms):")
        out.append("")
        out.append("| phase | kernel / op | launches | predicted ms | bound |"
                   + (" measured ms (fwd + bwd) |" if has_meas else ""))
        out.append("|---|---|---|---|---|" + ("---|" if has_meas else ""))
        for k in s["kernels"][:8]:
            bound = ", ".join(f"{b} x{n}" for b, n in k["bounds"].items())
            line = (f"| {k['phase']} | {k['name']} | {k['launches']} | {k['ms']:.3f} | "
                    f"{bound} |")
            if has_meas:
                ms = _measured_kernel_ms(s.get("measured"), k["name"])
                line += f" {ms:.3f} |" if ms is not None else " |"
            out.append(line)
        out.append("")
    out += ["## Compiled kernels", "",
            "Registers per thread, spills (bytes of local-memory stores + loads in the "
            "code), shared memory (static + dynamic), threads and resident blocks per SM "
            "(occupancy rules), tensor-core instructions (HGMMA = wgmma, HMMA = mma.sync), "
            "LDSM, global accesses (128-bit / narrower; LDGSTS = cp.async), machine "
            "instructions per main-loop iteration and per epilogue tile (static counts, "
            "epilogue loops weighted by their `@trips` annotations).", ""]
    out.append("| backend | kernel | role | arch | dtype | regs | spill B | smem B | threads "
               "| blocks/SM | HGMMA | HMMA | LDSM | LDG 128/narrow | LDGSTS 128/narrow | "
               "STG 128/narrow | main-loop insts/iter | epilogue insts/tile | config |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in sorted(rep["kernels"], key=lambda r: (r["backend"], r["role"] == "aux", r["name"],
                                                   r["arch"], r["dtype"])):
        g = k["global_access"]
        cfg = ", ".join(f"{a}={b}" for a, b in k.get("config", {}).items())
        out.append(
            f"| {k['backend']} | {k['name']} | {k['role']} | {k['arch']} | {k['dtype']} | "
            f"{k['regs']} | {k['spill_bytes']} | {k['smem_bytes']} | {k['threads']} | "
            f"{k['blocks_per_sm']} ({k['occupancy_limiter']}) | {k['tensor_core']['hgmma']} | "
            f"{k['tensor_core']['hmma']} | {k['ldsm']} | {g.get('ldg_128', 0)}/"
            f"{g.get('ldg_narrow', 0)} | {g.get('ldgsts_128', 0)}/{g.get('ldgsts_narrow', 0)} | "
            f"{g.get('stg_128', 0)}/{g.get('stg_narrow', 0)} | "
            f"{k['main_loop_insts_per_iter'] if k['main_loop_insts_per_iter'] is not None else '-'} | "
            f"{k['epilogue_insts_per_tile'] if k['epilogue_insts_per_tile'] is not None else '-'} "
            f"| {cfg} |")
    out.append("")
    return "\n".join(out)
