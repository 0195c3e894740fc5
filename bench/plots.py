"""PNG plots of a results CSV: time and memory against C, one line per provider.

One figure per (device, dtype, loss, mode, N, D) group that has at least two values of C,
with two panels on log-log axes: the median time (20-80% band) and the extra peak
memory beyond the inputs and the gradients (``workspace_mib``; the inputs W and the
gradient dW grow with C for everyone, so they are left out to show what each provider
adds). Uses matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List, Sequence


def _groups(rows: Sequence[Dict]):
    g = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok" and r.get("time_ms", "") != "":
            g[(r["device"], r["dtype"], r["loss"], r["mode"], int(r["N"]), int(r["D"]))].append(r)
    return g


def plot_results(rows: Sequence[Dict], out_dir: str, tag: str) -> List[str]:
    """Write one PNG per group with >= 2 values of C; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (dev, dtype, loss, mode, n, d), rs in sorted(_groups(rows).items()):
        if len({int(r["C"]) for r in rs}) < 2:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        by_prov: Dict[str, list] = defaultdict(list)
        for r in rs:
            by_prov[r["provider"]].append(r)
        for prov, pr in sorted(by_prov.items()):
            pr.sort(key=lambda r: int(r["C"]))
            cs = [int(r["C"]) for r in pr]
            t = [float(r["time_ms"]) for r in pr]
            line, = ax_t.plot(cs, t, marker="o", label=prov)
            lo = [float(r["time_q20_ms"] or r["time_ms"]) for r in pr]
            hi = [float(r["time_q80_ms"] or r["time_ms"]) for r in pr]
            ax_t.fill_between(cs, lo, hi, color=line.get_color(), alpha=0.15)
            mem = [(int(r["C"]), float(r["workspace_mib"])) for r in pr
                   if r.get("workspace_mib", "") != ""]
            if mem:
                ax_m.plot([c for c, _ in mem], [max(m, 1e-3) for _, m in mem], marker="o",
                          color=line.get_color(), label=prov)
        wgrad = sorted({(int(r["C"]), int(r["C"]) * d * _itemsize(dtype) / 2**20)
                        for r in rs})
        ax_m.plot([c for c, _ in wgrad], [m for _, m in wgrad], "k:", lw=1,
                  label="size of W (= dW)")
        for ax, title, unit in ((ax_t, "time", "ms"),
                                (ax_m, "extra peak memory beyond inputs and gradients",
                                 "MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("classes C")
            ax.set_ylabel(unit)
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        ax_m.legend(fontsize=8)
        fig.suptitle(f"{mode} ({'fwd+bwd' if mode == 'full' else mode}), {loss}, N={n}, "
                     f"D={d}, {dtype}, {dev}", fontsize=11)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{tag}_{mode}_N{n}_D{d}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _itemsize(dtype: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}.get(dtype, 4)
