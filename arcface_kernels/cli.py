"""Command line: ``arcface-kernels demo | bench | check | info``, and ``--version``.

Also reachable as ``python -m arcface_kernels``. ``demo`` trains a small network with
ArcFaceLoss on a synthetic 100,000-class problem (see :mod:`arcface_kernels.demo`);
``check MODULE:FUNCTION`` runs the gradient-check suite (:mod:`arcface_kernels.testing`)
on anyone's loss function and exits 1 when a case fails; ``bench`` runs the benchmark
suite (:mod:`arcface_kernels.bench`; results go to
./arcface-bench/ unless --out says otherwise); ``info`` prints the versions, the backends
(and why any is unavailable), whether the C++ extension was built (and with CUDA) and the
devices.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import sys
from typing import Dict, List, Optional

import torch

from ._version import __version__
from .backends import ALL_BACKENDS

DEVICE_TYPES = ("cpu", "cuda")


def _number(kind, ok, wanted: str):
    """An argparse type: parse with ``kind`` (int or float), accept when ``ok(v)``;
    the error names the value and what was wanted."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return v
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_int = _number(int, lambda v: True, "an integer")
_positive_float = _number(float, lambda v: 0 < v < math.inf, "a finite positive number")
_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
_margin = _number(float, lambda v: 0.0 <= v < math.pi, "a margin in [0, 3.14)")


def _device(text: str) -> str:
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (use cpu, cuda or cuda:N)")
    if dev.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(
            f"unsupported device {text!r} (use cpu, cuda or cuda:N)")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``arcface-kernels`` command (subcommands demo, info)."""
    from .demo import DemoConfig
    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="arcface-kernels",
        description="Fused ArcFace / margin-softmax losses for huge class counts.")
    parser.add_argument("--version", action="version",
                        version=f"arcface-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,check,info}")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="train a small network with ArcFaceLoss on a synthetic huge-class "
                     "problem; print a table, write a plot",
        description="Train a small MLP with ArcFaceLoss on a synthetic problem with a huge "
                    "number of classes (made on the fly), on the best backend; print "
                    "steps/s, accuracy and the peak memory of one loss step against the "
                    "naive reference; write a PNG of the curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--classes", type=_positive_int, default=d.classes,
                      help="number of classes C (>= 2)")
    demo.add_argument("--dim", type=_positive_int, default=d.dim, help="embedding size D")
    demo.add_argument("--batch", type=_positive_int, default=d.batch, help="batch size N")
    demo.add_argument("--steps", type=_positive_int, default=d.steps, help="training steps")
    demo.add_argument("--backend", choices=("auto",) + ALL_BACKENDS, default=d.backend,
                      help="loss backend")
    demo.add_argument("--device", type=_device, default=d.device,
                      help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    demo.add_argument("--lr", type=_positive_float, default=d.lr, help="SGD learning rate")
    demo.add_argument("--seed", type=_int, default=d.seed, help="random seed")
    demo.add_argument("--out", default=d.out,
                      help="path of the PNG plot ('' for no plot)")
    demo.add_argument("--json", default=None, metavar="PATH",
                      help="also write the results and per-step history as JSON")
    demo.add_argument("--scale", type=_positive_float, default=d.scale, help="logit scale s")
    demo.add_argument("--margin", type=_margin, default=d.margin,
                      help="ArcFace additive angular margin m2 (after warm-up)")
    demo.add_argument("--margin-warmup", type=_fraction, default=d.margin_warmup,
                      help="fraction of the steps over which the margin rises from 0")
    demo.add_argument("--working-set", type=_nonneg_int, default=d.working_set,
                      help="classes a batch is drawn from at a time (0: 2 x batch)")
    demo.add_argument("--repeats", type=_positive_int, default=d.repeats,
                      help="expected samples of a class while it is in the working set")
    demo.add_argument("--threads", type=_nonneg_int, default=d.threads,
                      help="CPU threads (0: torch's default)")
    demo.add_argument("--no-reference", action="store_true",
                      help="skip measuring the naive reference's memory")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo, parser=demo)

    sub.add_parser("bench", add_help=False,
                   help="run the benchmark suite (arcface-kernels bench --help); results "
                        "go to ./arcface-bench/ unless --out says otherwise")
    chk = sub.add_parser(
        "check", help="check a margin-loss (or linear cross-entropy) implementation "
                      "against the float64 oracle; exit 1 on a failure",
        description="Run arcface_kernels.testing's grid on FUNCTION(embeddings, weight, "
                    "labels, **settings) -> loss, imported from MODULE (the current "
                    "directory is on the import path). A `supports` attribute of the "
                    "function declares the settings it implements. Exit status: 0 all "
                    "passed, 1 a case failed, 2 bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    chk.add_argument("target", metavar="MODULE:FUNCTION")
    chk.add_argument("--kind", choices=("margin", "linear"), default="margin",
                     help="margin loss grid, or plain linear cross-entropy")
    chk.add_argument("--device", type=_device, default=None, action="append",
                     dest="devices",
                     help="device to run on, repeatable (default: cpu)")
    chk.add_argument("--dtypes", default="float64,float32",
                     help="comma list among float64, float32, float16, bfloat16")
    chk.add_argument("--cases", default=None, help="comma list of grid case names")
    chk.add_argument("--shapes", default=None, metavar="NxCxD,...",
                     help="run each chosen case at these shapes instead of its own")
    chk.add_argument("--random", type=_nonneg_int, default=0, metavar="N",
                     help="also N randomized cases (shrunk with hypothesis if installed)")
    chk.add_argument("--seed", type=_int, default=0, help="seed of the randomized cases")
    chk.add_argument("--atol-scale", type=_positive_float, default=1.0,
                     help="multiply every tolerance")
    chk.add_argument("--no-gradcheck", action="store_true", help="skip gradcheck")
    chk.add_argument("--all", action="store_true", help="print every case, not only "
                                                        "the failures")
    chk.set_defaults(func=_cmd_check, parser=chk)
    info = sub.add_parser("info", help="print versions, backends, build and devices")
    info.set_defaults(func=_cmd_info, parser=info)
    return parser


def _check_demo_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need more than one flag or the machine; parser.error names the value."""
    from .backends import backend_status
    if args.classes < 2:
        parser.error(f"argument --classes: expected at least 2 classes, got {args.classes}")
    from .demo import resolve_device
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {args.device!r} requested but CUDA is not "
                         f"available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {args.device!r} but only "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    if args.backend != "auto":
        from .backends import resolve_backend
        try:
            resolve_backend(args.backend, dev)
        except ValueError as e:
            parser.error(f"argument --backend: {e}; status: {backend_status()[args.backend]}")


def _cmd_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_table, run_demo
    _check_demo_args(parser, args)
    try:
        cfg = DemoConfig(classes=args.classes, dim=args.dim, batch=args.batch,
                         steps=args.steps, backend=args.backend, device=args.device,
                         lr=args.lr, seed=args.seed, out=args.out, scale=args.scale,
                         margin=args.margin, margin_warmup=args.margin_warmup,
                         working_set=args.working_set, repeats=args.repeats,
                         threads=args.threads,
                         progress=not args.no_progress,
                         measure_reference=not args.no_reference)
    except ValueError as e:
        parser.error(str(e))
    res = run_demo(cfg)
    print(format_table(res), flush=True)
    if args.json:
        import json
        from .demo import result_dict
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result_dict(res), f, indent=1)
    return 0


def _load_target(parser: argparse.ArgumentParser, target: str):
    import importlib
    mod_name, sep, fn_name = target.partition(":")
    if not sep or not mod_name or not fn_name:
        parser.error(f"argument MODULE:FUNCTION: expected module:function, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        parser.error(f"argument MODULE:FUNCTION: cannot import {mod_name!r}: {e}")
    fn = mod
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            parser.error(f"argument MODULE:FUNCTION: {mod_name!r} has no {fn_name!r}")
    if not callable(fn):
        parser.error(f"argument MODULE:FUNCTION: {target!r} is not callable")
    return fn


def _cmd_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import testing
    fn = _load_target(parser, args.target)
    devices = args.devices or ["cpu"]
    if "auto" in devices:
        parser.error("argument --device: name the device (cpu, cuda or cuda:N)")
    try:
        dtypes = [testing.parse_dtype(d) for d in args.dtypes.split(",") if d]
        names = [c for c in args.cases.split(",") if c] if args.cases else None
        shapes = None
        if args.shapes:
            try:
                shapes = [tuple(int(v) for v in item.lower().split("x"))
                          for item in args.shapes.split(",") if item]
            except ValueError:
                parser.error(f"argument --shapes: expected NxCxD,..., got {args.shapes!r}")
        check = testing.check_margin_loss if args.kind == "margin" else \
            testing.check_linear_cross_entropy
        report = check(fn, names=names, shapes=shapes, dtypes=dtypes, devices=devices,
                       atol_scale=args.atol_scale, gradcheck=not args.no_gradcheck)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    reports = [report]
    if args.random and args.kind == "margin":
        reports.append(testing.fuzz_margin_loss(fn, examples=args.random, seed=args.seed,
                                                dtypes=dtypes, devices=devices,
                                                atol_scale=args.atol_scale))
    ok = True
    for rep in reports:
        print(rep.summary())
        if args.all or not rep.ok:
            print(rep.table(only_failures=not args.all))
        ok = ok and rep.ok
    return 0 if ok else 1


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def extension_info() -> Dict[str, str]:
    """Whether the C++ extension ``arcface_kernels._C`` is importable and built with CUDA."""
    try:
        from . import _C
    except (ImportError, OSError) as e:
        return {"built": "no", "detail": f"{type(e).__name__}: {e}"}
    with_cuda = getattr(_C, "WITH_CUDA", None)
    return {"built": "yes",
            "cuda": "unknown" if with_cuda is None else ("yes" if with_cuda else "no"),
            "path": getattr(_C, "__file__", "?")}


def device_lines() -> List[str]:
    """One line per device; CUDA is queried only where torch has it, and device
    properties only when a device is there."""
    lines = [f"cpu: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        lines.append("cuda: this torch build has no CUDA")
    elif not torch.cuda.is_available():
        lines.append(f"cuda: no device (torch built with CUDA {torch.version.cuda})")
    else:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, "
                         f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
    return lines


def info_text() -> str:
    """The text ``arcface-kernels info`` prints."""
    from . import __version__
    from .backends import backend_status, triton_interpreted
    lines = [f"arcface-kernels {__version__}",
             f"python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'}), triton {_version('triton') or 'not installed'}"
             + (" [TRITON_INTERPRET=1]" if triton_interpreted() else ""),
             "", "backends:"]
    status = backend_status()
    width = max(len(n) for n in status)
    lines += [f"  {name.ljust(width)}  {text}" for name, text in status.items()]
    ext = extension_info()
    lines += ["", "C++ extension (arcface_kernels._C):"]
    if ext["built"] == "yes":
        lines.append(f"  built: yes, with CUDA: {ext['cuda']} ({ext['path']})")
    else:
        lines.append(f"  built: no ({ext['detail']})")
    lines += ["", "devices:"] + [f"  {ln}" for ln in device_lines()]
    auto_cpu = _auto_name("cpu")
    auto = f"  backend 'auto' picks: {auto_cpu} on cpu"
    if torch.cuda.is_available():
        auto += f", {_auto_name('cuda')} on cuda"
    lines += [auto]
    return "\n".join(lines)


def _auto_name(device_type: str) -> str:
    from .backends import resolve_backend
    try:
        return resolve_backend("auto", torch.device(device_type)).name
    except RuntimeError as e:
        return f"none ({e})"


def _cmd_info(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    print(info_text(), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``arcface-kernels`` / ``python -m arcface_kernels``; returns the
    exit status (argparse exits with 2 on bad flags)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser, with all of its options
        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args.parser, args)


def bench_main(argv: List[str]) -> int:
    """``arcface-kernels bench ...``: the installed benchmark suite (the checkout's bench/
    when the source tree shadows the installed package)."""
    try:
        from .bench.run import main as run_main
    except ImportError:
        try:
            from bench.run import main as run_main  # type: ignore[no-redef]
        except ImportError as e:
            print(f"arcface-kernels bench: the benchmark suite is not importable ({e})",
                  file=sys.stderr)
            return 2
    return run_main(argv, prog="arcface-kernels bench")


if __name__ == "__main__":
    sys.exit(main())
