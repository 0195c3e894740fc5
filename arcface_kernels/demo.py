"""The demo: a small network learns embeddings for a huge synthetic class set.

``python -m arcface_kernels demo`` (see :mod:`arcface_kernels.cli` for the flags) builds a
classification problem with 100,000 classes on the fly, trains a few-layer MLP with
:class:`arcface_kernels.ArcFaceLoss` over *all* classes every step, shows a progress bar,
and ends with a table (backend, steps/s, accuracy, peak memory of one loss step against
the naive reference) and a PNG plot of the curves.

The data. Class j has a prototype p_j ~ N(0, I) in ``IN_DIM`` dimensions (from a seeded
generator); a sample of class j is ``tanh((p_j + noise * e) @ A) @ B`` with e ~ N(0, I)
and A, B fixed random matrices: a fixed random nonlinearity, so the network has to learn
a mapping to discriminative embeddings rather than read the class off its input.

The schedule. With 100,000 classes and a few hundred steps, uniform sampling would show
each class about once: nothing could be learned about it before the run ends. Batches are
therefore drawn from a *working set* of classes that slides through a seeded permutation
of all classes; each class stays in the working set long enough to be drawn about
``repeats`` times. The softmax always runs over all C classes. Training accuracy is the
top-1 over all C classes of the training batch, predicted in the forward pass *before*
that step's update (``ArcFaceLoss.last_stats``); a held-out accuracy on fresh samples of
the classes seen so far is measured at the end.

The margin. ArcFace from scratch with a large margin starts slowly, so the additive
angular margin m2 warms up linearly from 0 to its target over the first part of the run.

matplotlib and tqdm (the ``demo`` extra: ``pip install "arcface-kernels[demo]"``) are
optional: without tqdm there is no progress bar, and without matplotlib the run says so in
one line before training and prints its table without the plot.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ._memory import available_bytes, peak_memory
from .backends import resolve_backend
from .module import ArcFaceLoss
from .reference import reference_loss

IN_DIM = 64          # dimension of the class prototypes
FEATURE_DIM = 128    # dimension of the network's input (after the fixed nonlinearity)
HIDDEN = 256         # width of the MLP
NOISE = 0.5          # per-coordinate noise around a prototype
# The naive reference's step is measured directly only if this many bytes of its N x C
# matrices fit in this fraction of the available memory; otherwise it is measured at a
# smaller class count and scaled (and reported as estimated).
REFERENCE_MEMORY_FRACTION = 0.25


@dataclass
class DemoConfig:
    """Every knob of the demo (the CLI flags map one to one onto these fields)."""

    classes: int = 100_000
    dim: int = 64
    batch: int = 128
    steps: int = 150
    backend: str = "auto"
    device: str = "auto"         # auto: cuda when a CUDA device is there, else cpu
    lr: float = 0.1
    seed: int = 0
    out: str = os.path.join("demo_out", "demo.png")
    scale: float = 32.0
    margin: float = 0.5
    margin_warmup: float = 0.3   # fraction of the steps over which m2 goes 0 -> margin
    working_set: int = 0         # 0: 2 * batch
    repeats: int = 8             # expected samples of a class while it is in the working set
    threads: int = 0             # CPU threads; 0: torch's default
    progress: bool = True
    measure_reference: bool = True

    def __post_init__(self) -> None:
        for name in ("classes", "dim", "batch", "steps", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.classes < 2:
            raise ValueError(f"classes must be >= 2, got {self.classes!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) \
                or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0, got {self.threads!r}")
        if isinstance(self.working_set, bool) or not isinstance(self.working_set, int) \
                or self.working_set < 0:
            raise ValueError(f"working_set must be an int >= 0, got {self.working_set!r}")
        for name in ("lr", "scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.margin, (int, float)) and 0.0 <= self.margin < math.pi):
            raise ValueError(f"margin must be in [0, pi), got {self.margin!r}")
        if not (isinstance(self.margin_warmup, (int, float))
                and 0.0 <= self.margin_warmup <= 1.0):
            raise ValueError(f"margin_warmup must be in [0, 1], got {self.margin_warmup!r}")

    @property
    def window(self) -> int:
        """Classes in the working set (at most all classes)."""
        return min(self.classes, self.working_set or 2 * self.batch)

    @property
    def stride(self) -> int:
        """Classes the working set advances by per step."""
        return max(1, self.batch // self.repeats)


class SyntheticClasses:
    """A huge synthetic class set, made on the fly from a seed.

    prototypes [C, IN_DIM] ~ N(0, 1); ``sample(labels)`` [N, FEATURE_DIM] =
    tanh((p_y + NOISE * e) @ A) @ B with fixed random A [IN_DIM, FEATURE_DIM] and
    B [FEATURE_DIM, FEATURE_DIM].
    """

    def __init__(self, num_classes: int, seed: int, device: torch.device):
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.prototypes = torch.randn(num_classes, IN_DIM, generator=g).to(self.device)
        self.mix_a = (torch.randn(IN_DIM, FEATURE_DIM, generator=g)
                      * (1.5 / math.sqrt(IN_DIM))).to(self.device)
        self.mix_b = (torch.randn(FEATURE_DIM, FEATURE_DIM, generator=g)
                      / math.sqrt(FEATURE_DIM)).to(self.device)
        self.order = torch.randperm(num_classes, generator=g)  # the working set's path

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Inputs [N, FEATURE_DIM] for class ids ``labels`` [N] (int64, on CPU)."""
        noise = torch.randn(labels.shape[0], IN_DIM, generator=generator).to(self.device)
        z = self.prototypes[labels.to(self.device)] + NOISE * noise
        return torch.tanh(z @ self.mix_a) @ self.mix_b

    def working_set_labels(self, step: int, cfg: DemoConfig,
                           generator: torch.Generator) -> Tensor:
        """Labels [batch] (CPU int64) drawn uniformly from the working set at ``step``."""
        pos = step * cfg.stride + torch.randint(0, cfg.window, (cfg.batch,),
                                                generator=generator)
        return self.order[pos % self.num_classes]

    def visited(self, steps_done: int, cfg: DemoConfig) -> Tensor:
        """The class ids the working set has covered after ``steps_done`` steps."""
        n = min(self.num_classes, (steps_done - 1) * cfg.stride + cfg.window)
        return self.order[:n]

    def current(self, step: int, cfg: DemoConfig) -> Tensor:
        """The class ids of the working set at ``step``."""
        pos = step * cfg.stride + torch.arange(cfg.window)
        return self.order[pos % self.num_classes]


def build_network(dim: int) -> nn.Module:
    """The embedding network: FEATURE_DIM -> HIDDEN -> HIDDEN -> dim, BN on the output
    (as insightface's backbones end)."""
    return nn.Sequential(
        nn.Linear(FEATURE_DIM, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, dim), nn.BatchNorm1d(dim))


@dataclass
class DemoResult:
    """What a demo run measured (the table and the plot are made from this)."""

    config: DemoConfig
    backend: str
    device: str = "cpu"
    history: Dict[str, List[float]] = field(default_factory=dict)
    train_seconds: float = 0.0
    steps_per_s: float = 0.0
    final_train_acc: float = 0.0
    first_train_acc: float = 0.0
    heldout_acc: float = 0.0          # fresh samples of every class seen so far
    heldout_recent_acc: float = 0.0   # fresh samples of the last working set's classes
    classes_seen: int = 0
    kernel_peak_bytes: int = 0
    kernel_step_s: float = 0.0
    reference_peak_bytes: int = 0
    reference_estimated: bool = False
    reference_note: str = ""
    plot_path: Optional[str] = None
    threads: str = ""


PLOT_EXTRA_HINT = 'pip install "arcface-kernels[demo]"'


def plotting_available() -> bool:
    """Whether matplotlib (for the PNG plot) can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when a CUDA device is available, else cpu; else the device named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _progress(iterable, cfg: DemoConfig, desc: str):
    """tqdm's bar over ``iterable`` when tqdm is installed and cfg.progress, else a plain
    wrapper with the same close / set_postfix methods (doing nothing)."""
    if cfg.progress and importlib.util.find_spec("tqdm") is not None:
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=desc, unit="step", dynamic_ncols=True)

    class _Plain:
        def __iter__(self):
            return iter(iterable)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass
    return _Plain()


def _margin_at(step: int, cfg: DemoConfig) -> float:
    ramp = cfg.margin_warmup * cfg.steps
    if ramp <= 0:
        return cfg.margin
    return cfg.margin * min(1.0, (step + 1) / ramp)


def _loss_step_memory(loss_fn, emb: Tensor, weight: Tensor, device: torch.device):
    """Peak bytes and seconds of forward + backward of one head step."""
    def step():
        emb.grad = None
        weight.grad = None
        t0 = time.perf_counter()
        loss_fn().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    peak, seconds = peak_memory(step, device)
    emb.grad = None
    weight.grad = None
    return peak, seconds


def measure_memory(head: ArcFaceLoss, emb: Tensor, labels: Tensor, device: torch.device,
                   measure_reference: bool = True) -> Dict[str, object]:
    """Peak memory of one loss step (forward + backward of the head) on ``head``'s
    backend and on the naive reference, for embeddings ``emb`` [N, D] and ``labels`` [N].

    The reference is run at the same shape when its N x C matrices fit comfortably in
    memory; otherwise at fewer classes, scaled linearly to C, and marked estimated.
    """
    cfg = head.cfg
    emb = emb.detach().clone().requires_grad_(True)
    weight = head.weight
    kernel_peak, kernel_s = _loss_step_memory(lambda: head(emb, labels), emb, weight, device)
    n, c = emb.shape[0], weight.shape[0]
    out = {"kernel_peak": kernel_peak, "kernel_s": kernel_s, "reference_peak": 0,
           "reference_estimated": False, "reference_note": "not measured"}
    if not measure_reference:
        return out
    nxc_bytes = n * c * 4
    avail = available_bytes(device)
    budget = (avail if avail is not None else 8 << 30) * REFERENCE_MEMORY_FRACTION
    # The reference holds several N x C float32 copies (cosines, logits, softmax, grads).
    copies = 8
    c_run = c if nxc_bytes * copies <= budget else max(1, int(budget // (n * 4 * copies)))
    w_run = weight if c_run == c else weight[:c_run].detach().clone().requires_grad_(True)
    lab_run = labels if c_run == c else labels % c_run

    def ref():
        return reference_loss(emb, w_run, lab_run, s=cfg.s, m1=cfg.m1, m2=cfg.m2, m3=cfg.m3,
                              margin_mode=cfg.margin_mode, target_grad=cfg.target_grad)
    ref_peak, _ = _loss_step_memory(ref, emb, w_run, device)
    if c_run == c:
        out.update(reference_peak=ref_peak, reference_note="measured")
    else:
        out.update(reference_peak=int(ref_peak * c / c_run), reference_estimated=True,
                   reference_note=f"estimated: measured at C={c_run}, scaled to C={c}")
    return out


def _heldout_accuracy(net: nn.Module, head: ArcFaceLoss, data: SyntheticClasses,
                      classes: Tensor, n: int, gen: torch.Generator) -> float:
    """Top-1 over all classes on ``n`` fresh samples of ``classes`` (CPU int64)."""
    pick = classes[torch.randint(0, classes.numel(), (n,), generator=gen)]
    labels = pick.to(data.device)
    with torch.no_grad():
        head(net(data.sample(pick, gen)), labels)
    return float(head.last_stats.accuracy(labels))


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Train, measure, plot. Returns the :class:`DemoResult` (also see :func:`format_table`)."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads, why = torch.get_num_threads(), ("as asked" if cfg.threads else "default")
    plot = bool(cfg.out)
    if plot and not plotting_available():
        print(f"demo: matplotlib is not installed, so no plot will be written "
              f"({PLOT_EXTRA_HINT} adds it)", flush=True)
        plot = False
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    data = SyntheticClasses(cfg.classes, cfg.seed, device)
    net = build_network(cfg.dim).to(device)
    head = ArcFaceLoss(cfg.dim, cfg.classes, s=cfg.scale, m2=_margin_at(0, cfg),
                       backend=cfg.backend, device=device)
    backend = resolve_backend(cfg.backend, device).name
    opt = torch.optim.SGD([{"params": net.parameters()},
                           {"params": head.parameters()}],
                          lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    # Linear warm-up over the first 5% of the steps, then constant: new classes keep
    # entering the working set, and their centres need a full-size step to be learned.
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    hist: Dict[str, List[float]] = {"step": [], "loss": [], "acc": [], "margin": []}
    bar = _progress(range(cfg.steps), cfg, f"demo [{backend}, C={cfg.classes:,}]")
    acc_ema = None
    t0 = time.perf_counter()
    for step in bar:
        m2 = head.m2 = _margin_at(step, cfg)   # validated, used from this step on
        labels_cpu = data.working_set_labels(step, cfg, gen)
        x = data.sample(labels_cpu, gen)
        labels = labels_cpu.to(device)
        loss = head(net(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = float(head.last_stats.accuracy(labels))
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise RuntimeError(f"loss became {lv} at step {step}; try a smaller --lr "
                               f"(got {cfg.lr})")
        acc_ema = acc if acc_ema is None else 0.9 * acc_ema + 0.1 * acc
        hist["step"].append(step + 1)
        hist["loss"].append(lv)
        hist["acc"].append(acc)
        hist["margin"].append(m2)
        bar.set_postfix(loss=f"{lv:.2f}", acc=f"{acc_ema:.1%}", m=f"{m2:.2f}", refresh=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0
    bar.close()

    res = DemoResult(config=cfg, backend=backend, device=str(device), history=hist,
                     train_seconds=train_s, threads=f"{threads} ({why})")
    res.steps_per_s = cfg.steps / train_s
    tail = max(1, cfg.steps // 10)
    res.final_train_acc = sum(hist["acc"][-tail:]) / tail
    res.first_train_acc = sum(hist["acc"][:tail]) / tail

    # Held-out: fresh samples (new noise), top-1 over all C classes, of every class seen
    # so far and of the classes in the last working set.
    net.eval()
    seen = data.visited(cfg.steps, cfg)
    res.classes_seen = int(seen.numel())
    res.heldout_acc = _heldout_accuracy(net, head, data, seen, 4 * cfg.batch, gen)
    res.heldout_recent_acc = _heldout_accuracy(net, head, data,
                                               data.current(cfg.steps - 1, cfg),
                                               2 * cfg.batch, gen)

    # Memory of one loss step at the training shape, kernels vs the naive reference.
    labels_cpu = data.working_set_labels(cfg.steps, cfg, gen)
    with torch.no_grad():
        emb = net(data.sample(labels_cpu, gen))
    mem = measure_memory(head, emb, labels_cpu.to(device), device, cfg.measure_reference)
    res.kernel_peak_bytes = mem["kernel_peak"]
    res.kernel_step_s = mem["kernel_s"]
    res.reference_peak_bytes = mem["reference_peak"]
    res.reference_estimated = mem["reference_estimated"]
    res.reference_note = mem["reference_note"]

    if plot:
        res.plot_path = plot_history(res, cfg.out)
    return res


def plot_history(res: DemoResult, path: str) -> str:
    """Write the loss and accuracy curves of ``res`` to the PNG ``path``; returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, cfg = res.history, res.config
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(h["step"], h["loss"], lw=1, color="tab:blue")
    ax1.set_xlabel("step")
    ax1.set_ylabel("ArcFace loss")
    ax1.set_title("loss (margin warms up, so loss can rise early)")
    ax1.grid(alpha=0.3)
    axm = ax1.twinx()
    axm.plot(h["step"], h["margin"], lw=1, ls="--", color="tab:gray")
    axm.set_ylabel("margin m2", color="tab:gray")
    k = max(1, len(h["acc"]) // 30)
    smooth = [sum(h["acc"][max(0, i - k + 1):i + 1]) / len(h["acc"][max(0, i - k + 1):i + 1])
              for i in range(len(h["acc"]))]
    ax2.plot(h["step"], [100 * a for a in h["acc"]], lw=0.6, alpha=0.4, color="tab:green",
             label="per batch")
    ax2.plot(h["step"], [100 * a for a in smooth], lw=1.5, color="tab:green",
             label=f"moving mean ({k} steps)")
    ax2.axhline(100 * res.heldout_recent_acc, ls="--", color="k", lw=1,
                label=f"held-out, last working set {res.heldout_recent_acc:.1%}")
    ax2.axhline(100 * res.heldout_acc, ls=":", color="k",
                label=f"held-out, all {res.classes_seen:,} seen {res.heldout_acc:.1%}")
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"top-1 over {cfg.classes:,} classes (%)")
    ax2.set_ylim(0, 100)
    ax2.set_title("training-batch accuracy (before each update)")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="center right", fontsize="small")
    fig.suptitle(f"arcface-kernels demo: backend={res.backend}, C={cfg.classes:,}, "
                 f"D={cfg.dim}, N={cfg.batch}, s={cfg.scale:g}, m2={cfg.margin:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def result_dict(res: DemoResult) -> Dict[str, object]:
    """``res`` as plain JSON-able data (config, measurements and the per-step history)."""
    out = dataclasses.asdict(res)
    out["config"] = dataclasses.asdict(res.config)
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_table(res: DemoResult) -> str:
    """The closing summary: a short table plus a few explanatory lines."""
    cfg = res.config
    rows = [("loss", "backend", "steps/s", "train acc", "held-out acc (recent/all)",
             "loss-step peak memory")]
    rows.append(("ArcFaceLoss", res.backend, f"{res.steps_per_s:.2f}",
                 f"{res.final_train_acc:.1%}",
                 f"{res.heldout_recent_acc:.1%} / {res.heldout_acc:.1%}",
                 _fmt_bytes(res.kernel_peak_bytes)))
    if res.reference_peak_bytes:
        ratio = res.reference_peak_bytes / max(1, res.kernel_peak_bytes)
        tag = "estimated" if res.reference_estimated else "measured"
        rows.append(("naive reference", "reference", "-", "-", "-",
                     f"{_fmt_bytes(res.reference_peak_bytes)} ({tag}, {ratio:.1f}x)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        f"problem: C={cfg.classes:,} classes, D={cfg.dim}, batch N={cfg.batch}, "
        f"{cfg.steps} steps in {res.train_seconds:.1f} s on {res.device} "
        f"(threads: {res.threads}); "
        f"s={cfg.scale:g}, ArcFace margin m2 warmed up 0 -> {cfg.margin:g} over the first "
        f"{cfg.margin_warmup:.0%} of the steps",
        f"accuracy: top-1 over all {cfg.classes:,} classes; train = training batches of the "
        f"last 10% of steps, predicted before each update (first 10%: "
        f"{res.first_train_acc:.1%}); held-out = fresh samples of the last working set's "
        f"{cfg.window:,} classes / of all {res.classes_seen:,} classes seen",
        f"memory: one forward + backward of the head at N={cfg.batch}, C={cfg.classes:,}, "
        f"D={cfg.dim} (peak bytes beyond live tensors); reference: {res.reference_note}",
    ]
    if res.plot_path:
        lines.append(f"plot: {res.plot_path}")
    return "\n".join(lines)
