"""PartialFC over real multi-process gloo groups on the CPU, against the float64
single-process reference (arcface_kernels.reference.reference_loss on the full weight).

To keep CI short, two process groups are started once per test session (2 ranks and 3
ranks, launched together as subprocesses of this very file: ``python test_partial_fc.py
--worker ...``); each worker runs every check of the plan below (every CPU backend, loss
modes, sampling, bad inputs; triton through TRITON_INTERPRET) and writes its measurements to a JSON file; the pytest tests
then assert on them, one test per (world size, check). A hung group is killed after
GROUP_TIMEOUT_S and reported as a failure, never as a hang.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from datetime import timedelta

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import arcface_kernels as ak  # noqa: E402
from arcface_kernels.partial_fc import PartialFC, shard_range  # noqa: E402
from arcface_kernels.reference import reference_loss  # noqa: E402
from _cases import make_inputs, max_rel_err  # noqa: E402
from _insightface import CONFIGS as IF_CONFIGS, CombinedMarginLossStandIn, \
    insightface_loss, make_problem  # noqa: E402

GROUP_TIMEOUT_S = 170
WORLDS = (2, 3)
N_LOCAL, C, D = 5, 11, 7          # C = 11 divides by neither 2 nor 3
C_SAMPLED = 40                    # sampling cases: enough classes to leave some out
IGNORE = -100
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}

# Loss modes checked on every backend (keyword arguments of PartialFC / reference_loss).
MODES = {
    "arcface": dict(s=64.0, m2=0.5),
    "cosface_smoothing": dict(s=64.0, m2=0.0, m3=0.35, label_smoothing=0.1),
    "sub_centers": dict(s=64.0, m2=0.5, sub_centers=2),
    "sphereface_sum": dict(s=30.0, m1=1.35, m2=0.0, reduction="sum"),
    "combined_none": dict(s=32.0, m1=1.0, m2=0.3, m3=0.2, reduction="none"),
}
# Sampling cases: (sample_rate, mode); rate 0.04 gives num_sample = 0: only positives.
SAMPLING = {
    "rate_0.5": (0.5, dict(s=64.0, m2=0.5)),
    "rate_0.5_sub_centers_smoothing": (0.5, dict(s=32.0, m2=0.3, sub_centers=2,
                                                  label_smoothing=0.1)),
    "rate_0.04_positives_only": (0.04, dict(s=64.0, m2=0.5)),
}
BAD_INPUTS = ("label_too_big", "label_negative", "batch_size_differs", "weight_shape",
              "num_classes_differs", "dtype_differs", "labels_float")
# insightface's configurations (tests/_insightface.py) through PartialFC.from_insightface,
# dense, and one with sampling
IF_SAMPLED = "arcface_interclass"


def cpu_backends():
    """Every available backend that runs on the CPU (triton: through TRITON_INTERPRET,
    which conftest.py switches on without a GPU; the workers inherit it)."""
    from arcface_kernels.backends import _load
    return [name for name in ak.available_backends() if "cpu" in _load(name).devices]


def planned_checks(backends):
    """Names of the measured checks every worker reports."""
    names = []
    for be in backends:
        names += [f"{be}/{m}/float64" for m in MODES]
        names += [f"{be}/arcface/float32", f"{be}/stats", f"{be}/rate_1",
                  f"{be}/sampling_path_all_classes", f"{be}/tiny_C_empty_shard"]
        names += [f"{be}/{s}" for s in SAMPLING]
        names += [f"{be}/insightface/{m}" for m in IF_CONFIGS]
        names += [f"{be}/insightface/{IF_SAMPLED}/half_the_classes"]
    return names


# =========================================================================== worker side
def _ref(x, w, y, **kw):
    """(loss, dx, dw) of the float64 reference; gradients of loss.sum()."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = reference_loss(x, w, y, ignore_index=IGNORE, **kw)
    dx, dw = torch.autograd.grad(loss.sum(), (x, w))
    return loss.detach(), dx, dw


class _Worker:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world
        self.results = {}

    def problem(self, c=C, k=1, seed=0):
        x, w, y = make_inputs(self.world * N_LOCAL, c, D, seed=seed, sub_centers=k,
                              ignore_index=IGNORE)
        return x, w, y

    def local(self, t):
        return t[self.rank * N_LOCAL:(self.rank + 1) * N_LOCAL]

    def module(self, backend, c, mode, dtype=torch.float64, w_full=None, **extra):
        kw = {k: v for k, v in mode.items()}
        pfc = PartialFC(D, c, backend=backend, dtype=dtype, ignore_index=IGNORE, **kw,
                        **extra)
        if w_full is not None:
            k = mode.get("sub_centers", 1)
            with torch.no_grad():
                pfc.weight.copy_(w_full[pfc.class_start * k:(pfc.class_start + pfc.num_local)
                                        * k])
        return pfc

    def run_pfc(self, pfc, x, y, dtype):
        xl = self.local(x).to(dtype).clone().requires_grad_(True)
        loss = pfc(xl, self.local(y))
        loss.sum().backward()
        return loss.detach(), xl.grad, pfc.weight.grad

    def record(self, name, got, want, tol, extra=None):
        rec = {"tol": tol}
        for key, g, r in zip(("loss", "dx", "dw"), got, want):
            if g is None or g.shape != r.shape:
                rec[key] = f"shape {None if g is None else tuple(g.shape)} != {tuple(r.shape)}"
            elif not torch.isfinite(g).all():
                rec[key] = "non-finite values"
            else:
                rec[key] = max_rel_err(g, r)
        rec.update(extra or {})
        self.results[name] = rec

    def shard_rows(self, pfc, t, k):
        return t[pfc.class_start * k:(pfc.class_start + pfc.num_local) * k]

    def check_dense(self, name, backend, mode, dtype, c=C, **extra):
        k = mode.get("sub_centers", 1)
        x, w, y = self.problem(c=c, k=k)
        want_loss, want_dx, want_dw = _ref(x, w, y, **mode)
        pfc = self.module(backend, c, mode, dtype, w_full=w, **extra)
        got = self.run_pfc(pfc, x, y, dtype)
        want = (want_loss, self.world * self.local(want_dx), self.shard_rows(pfc, want_dw, k))
        self.record(name, got, want, TOL[dtype], {"weight_index_is_none":
                                                 pfc.weight_index is None})
        return pfc

    def check_stats(self, backend):
        x, w, y = self.problem()
        pfc = self.module(backend, C, MODES["arcface"], w_full=w, track_stats=True)
        self.run_pfc(pfc, x, y, torch.float64)
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
        want_pred = cos.argmax(dim=1)
        st = pfc.last_stats
        self.results[f"{backend}/stats"] = {
            "pred_equal": bool(torch.equal(st.prediction, want_pred)),
            "max_logit_err": max_rel_err(st.max_logit, 64.0 * cos.max(dim=1).values)}

    def check_sampled(self, name, backend, rate, mode, force_all=False):
        import torch.distributed as dist
        k = mode.get("sub_centers", 1)
        x, w, y = self.problem(c=C_SAMPLED, k=k, seed=1)
        gen = torch.Generator().manual_seed(100 + self.rank)
        pfc = self.module(backend, C_SAMPLED, mode, w_full=w, sample_rate=rate,
                          generator=gen)
        if force_all:  # the sampling code path with every class sampled
            pfc.num_sample = pfc.num_local
        got = self.run_pfc(pfc, x, y, torch.float64)
        idx = pfc.weight_index
        all_idx = [None] * self.world
        dist.all_gather_object(all_idx, (pfc.class_start, idx.tolist()))
        ids = torch.tensor([s + i for s, ii in all_idx for i in ii], dtype=torch.long)
        valid = y != IGNORE
        pos_in = torch.isin(y[valid], ids).all().item()
        rows = (ids.unsqueeze(1) * k + torch.arange(k)).reshape(-1)
        y_s = torch.where(valid, torch.searchsorted(ids, y.clamp(min=0)), y)
        want_loss, want_dx, want_dws = _ref(x, w[rows], y_s, **mode)
        want_dw = torch.zeros_like(w).index_add_(0, rows, want_dws)
        want = (want_loss, self.world * self.local(want_dx), self.shard_rows(pfc, want_dw, k))
        mine = (idx.unsqueeze(1) * k + torch.arange(k)).reshape(-1)
        outside = torch.ones(pfc.weight.shape[0], dtype=torch.bool)
        outside[mine] = False
        in_shard = (y >= pfc.class_start) & (y < pfc.class_start + pfc.num_local)
        extra = {"positives_sampled": bool(pos_in),
                 "num_positives": int(torch.unique(y[in_shard]).numel()),
                 "dw_zero_outside": bool((pfc.weight.grad[outside] == 0).all()),
                 "num_sampled": int(idx.numel()), "num_sample": pfc.num_sample,
                 "sorted": bool((idx[1:] > idx[:-1]).all()) if idx.numel() > 1 else True}
        if force_all:
            extra["index_is_all"] = bool(torch.equal(idx, torch.arange(pfc.num_local)))
        self.record(name, got, want, TOL[torch.float64], extra)

    def sampled_ids(self, pfc):
        """The global class ids every rank sampled (sorted), from each rank's index."""
        import torch.distributed as dist
        all_idx = [None] * self.world
        dist.all_gather_object(all_idx, (pfc.class_start, pfc.weight_index.tolist()))
        return torch.tensor([s + i for s, ii in all_idx for i in ii], dtype=torch.long)

    def check_insightface(self, backend, config, rate=1.0):
        """PartialFC.from_insightface (insightface's positional arguments, int32 labels)
        against the stand-in of insightface's loss on the full weight (or on the sampled
        classes of all ranks)."""
        import warnings
        margin = CombinedMarginLossStandIn(*IF_CONFIGS[config])
        c = C if rate == 1.0 else C_SAMPLED
        x, w, y = make_problem(self.world * N_LOCAL, c, D, seed=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pfc = PartialFC.from_insightface(margin, D, c, rate, False, backend=backend,
                                             dtype=torch.float64,
                                             generator=torch.Generator().manual_seed(
                                                 7 + self.rank))
        with torch.no_grad():
            pfc.weight.copy_(w[pfc.class_start:pfc.class_start + pfc.num_local])
        got = self.run_pfc(pfc, x, y.to(torch.int32), torch.float64)
        ids = torch.arange(c) if rate == 1.0 else self.sampled_ids(pfc)
        xr = x.clone().requires_grad_(True)
        wr = w[ids].clone().requires_grad_(True)
        loss = insightface_loss(xr, wr, torch.searchsorted(ids, y), margin)
        dx, dws = torch.autograd.grad(loss, (xr, wr))
        dw = torch.zeros_like(w).index_add_(0, ids, dws)
        want = (loss.detach(), self.world * self.local(dx), self.shard_rows(pfc, dw, 1))
        name = f"{backend}/insightface/{config}" + ("" if rate == 1.0 else
                                                     "/half_the_classes")
        self.record(name, got, want, TOL[torch.float64])

    def bad_input(self, case):
        """Run one bad input; record what this rank raised (must raise on every rank)."""
        x, w, y = self.problem()
        c, n, dtype = C, N_LOCAL, torch.float64
        xl, yl = self.local(x).clone(), self.local(y).clone()
        last = self.world - 1
        if case == "label_too_big" and self.rank == last:
            yl[0] = C
        if case == "label_negative" and self.rank == 0:
            yl[2] = -5
        if case == "batch_size_differs" and self.rank == 0:
            xl, yl = x[:n + 1], y[:n + 1]
        if case == "num_classes_differs" and self.rank == 0:
            c = C + 1
        if case == "labels_float" and self.rank == 0:
            yl = yl.to(torch.float32)
        if case == "dtype_differs" and self.rank == last:
            dtype = torch.float32
        pfc = PartialFC(D, c, backend="chunked", dtype=torch.float64, ignore_index=IGNORE)
        if case == "weight_shape" and self.rank == 1:
            pfc.weight = torch.nn.Parameter(torch.zeros(pfc.num_local + 1, D,
                                                        dtype=torch.float64))
        try:
            pfc(xl.to(dtype).requires_grad_(True), yl).backward()
            self.results[f"bad/{case}"] = {"raised": None}
        except (ValueError, TypeError) as e:
            self.results[f"bad/{case}"] = {"raised": type(e).__name__, "msg": str(e)}

    def check_nan(self):
        x, w, y = self.problem()
        x[self.world * N_LOCAL - 1] = float("nan")     # a row of the last rank, not ignored
        y[self.world * N_LOCAL - 1] = 0
        pfc = self.module("chunked", C, MODES["arcface"], w_full=w)
        loss = pfc(self.local(x), self.local(y))
        self.results["nan_in_nan_out"] = {"loss_is_nan": bool(torch.isnan(loss))}

    def run_all(self, backends):
        for be in backends:
            for m, mode in MODES.items():
                self._guard(f"{be}/{m}/float64", self.check_dense, f"{be}/{m}/float64", be,
                            mode, torch.float64)
            self._guard(f"{be}/arcface/float32", self.check_dense, f"{be}/arcface/float32",
                        be, MODES["arcface"], torch.float32)
            self._guard(f"{be}/stats", self.check_stats, be)
            self._guard(f"{be}/rate_1", self.check_dense, f"{be}/rate_1", be,
                        MODES["arcface"], torch.float64, sample_rate=1.0)
            self._guard(f"{be}/sampling_path_all_classes", self.check_sampled,
                        f"{be}/sampling_path_all_classes", be, 0.5, MODES["arcface"],
                        force_all=True)
            self._guard(f"{be}/tiny_C_empty_shard", self.check_dense,
                        f"{be}/tiny_C_empty_shard", be, MODES["arcface"], torch.float64, c=2)
            for s, (rate, mode) in SAMPLING.items():
                self._guard(f"{be}/{s}", self.check_sampled, f"{be}/{s}", be, rate, mode)
            for m in IF_CONFIGS:
                self._guard(f"{be}/insightface/{m}", self.check_insightface, be, m)
            self._guard(f"{be}/insightface/{IF_SAMPLED}/half_the_classes",
                        self.check_insightface,
                        be, IF_SAMPLED, 0.5)
        for case in BAD_INPUTS:
            self._guard(f"bad/{case}", self.bad_input, case)
        # the group still works after the errors
        self._guard("after_errors", self.check_dense, "after_errors", "chunked",
                    MODES["arcface"], torch.float64)
        self._guard("nan_in_nan_out", self.check_nan)
        self._guard("subgroup", self.check_subgroup)

    def check_subgroup(self):
        """process_group=a subgroup: ranks 0 and 1 of a 3-rank world form a 2-rank loss."""
        import torch.distributed as dist
        if self.world != 3:
            self.results["subgroup"] = {"not_run": True}
            return
        sub = dist.new_group([0, 1])          # every rank of the world must call it
        if self.rank == 2:
            self.results["subgroup"] = {"not_member": True}
            return
        inner = _Worker(self.rank, 2)
        inner.check_dense("subgroup", "chunked", MODES["arcface"], torch.float64,
                          process_group=sub)
        self.results["subgroup"] = inner.results["subgroup"]

    def _guard(self, name, fn, *args, **kw):
        try:
            fn(*args, **kw)
        except Exception:  # recorded; the parent test reports it
            self.results[name] = {"exception": traceback.format_exc()}


def worker_main(argv):
    import torch.distributed as dist
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--init", type=str)
    p.add_argument("--out", type=str)
    p.add_argument("--backends", type=str)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{a.init}", rank=a.rank,
                            world_size=a.world, timeout=timedelta(seconds=60))
    w = _Worker(a.rank, a.world)
    t0 = time.time()
    w.run_all([b for b in a.backends.split(",") if b])
    w.results["_seconds"] = time.time() - t0
    with open(a.out, "w") as f:
        json.dump(w.results, f)
    dist.destroy_process_group()


# =========================================================================== pytest side
if __name__ != "__main__":
    import pytest

    BACKENDS = cpu_backends()
    CHECKS = planned_checks(BACKENDS)

    @pytest.fixture(scope="module")
    def groups(tmp_path_factory):
        """Start the 2- and 3-rank groups together; {world: [results of each rank]}."""
        tmp = tmp_path_factory.mktemp("pfc")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = {}
        for world in WORLDS:
            init = tmp / f"init{world}"
            procs[world] = [subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", "--rank", str(r),
                 "--world", str(world), "--init", str(init),
                 "--out", str(tmp / f"w{world}r{r}.json"), "--backends", ",".join(BACKENDS)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for r in range(world)]
        deadline = time.time() + GROUP_TIMEOUT_S
        out = {}
        for world, ps in procs.items():
            logs, hung = [], False
            for p in ps:
                try:
                    so, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    so, _ = p.communicate()
                    hung = True
                logs.append(so.decode(errors="replace")[-3000:])
            res = []
            for r in range(world):
                f = tmp / f"w{world}r{r}.json"
                res.append(json.loads(f.read_text()) if f.exists() else None)
            out[world] = {"results": res, "hung": hung, "logs": logs,
                          "rc": [p.returncode for p in ps]}
        return out

    def _rank_results(groups, world):
        g = groups[world]
        assert not g["hung"], f"{world}-rank group hung (killed after {GROUP_TIMEOUT_S}s)"
        for r, res in enumerate(g["results"]):
            assert res is not None, (f"rank {r} of {world} wrote no results "
                                     f"(rc={g['rc'][r]}):\n{g['logs'][r]}")
        return g["results"]

    def _get(res, name, r):
        assert name in res, f"rank {r}: check {name} did not run"
        rec = res[name]
        assert "exception" not in rec, f"rank {r}: {name} raised:\n{rec['exception']}"
        return rec

    def test_sharding_is_insightface_split():
        for c in (1, 2, 7, 11, 100, 2_000_003):
            for w in (1, 2, 3, 8):
                ranges = [shard_range(c, w, r) for r in range(w)]
                assert sum(n for _, n in ranges) == c
                start = 0
                for r, (s, n) in enumerate(ranges):
                    assert s == start and n == c // w + (r < c % w)
                    start += n

    def test_single_process_equals_reference():
        x, w, y = make_inputs(9, C, D, seed=4, sub_centers=2, ignore_index=IGNORE)
        mode = dict(s=64.0, m2=0.5, sub_centers=2, label_smoothing=0.1)
        want = _ref(x, w, y, **mode)
        pfc = PartialFC(D, C, backend="chunked", dtype=torch.float64, ignore_index=IGNORE,
                        **mode)
        assert (pfc.rank, pfc.world_size, pfc.class_start, pfc.num_local) == (0, 1, 0, C)
        with torch.no_grad():
            pfc.weight.copy_(w)
        xr = x.clone().requires_grad_(True)
        loss = pfc(xr, y.view(-1, 1))      # insightface passes [N, 1] labels
        loss.backward()
        for name, g, r in zip(("loss", "dx", "dw"), (loss, xr.grad, pfc.weight.grad), want):
            assert max_rel_err(g, r) <= 1e-10, name

    def test_single_process_bad_arguments():
        with pytest.raises(ValueError, match="sample_rate"):
            PartialFC(D, C, sample_rate=0.0)
        with pytest.raises(ValueError, match="num_classes"):
            PartialFC(D, 0)
        pfc = PartialFC(D, C, dtype=torch.float64, backend="chunked")
        x = torch.randn(4, D, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"labels.*\[0, 11\)"):
            pfc(x, torch.tensor([0, 1, 11, 2]))
        with pytest.raises(ValueError, match="local_embeddings must have shape"):
            pfc(x[:, :3], torch.tensor([0, 1, 2, 3]))
        with pytest.raises(TypeError, match="integer tensor"):
            pfc(x, torch.tensor([0, 1, 2, 3], dtype=torch.float32))
        pfc.weight = torch.nn.Parameter(torch.zeros(C + 1, D, dtype=torch.float64))
        with pytest.raises(ValueError, match="weight has shape"):
            pfc(x, torch.tensor([0, 1, 2, 3]))

    def test_single_process_nan_in_nan_out():
        pfc = PartialFC(D, C, dtype=torch.float64, backend="chunked")
        x = torch.randn(3, D, dtype=torch.float64)
        x[1, 2] = float("nan")
        assert torch.isnan(pfc(x, torch.tensor([0, 1, 2])))

    def test_single_process_embedding_grad_scale():
        """An explicit embedding_grad_scale scales the embeddings' gradient also in a
        world of one rank (it used to be ignored there); the weight's is unchanged."""
        x, w, y = make_inputs(9, C, D, seed=4, ignore_index=IGNORE)
        grads = []
        for scale in (None, 1.0, 2.5):
            pfc = PartialFC(D, C, backend="chunked", dtype=torch.float64,
                            ignore_index=IGNORE, embedding_grad_scale=scale)
            with torch.no_grad():
                pfc.weight.copy_(w)
            xr = x.clone().requires_grad_(True)
            pfc(xr, y).backward()
            grads.append((xr.grad, pfc.weight.grad))
        assert torch.equal(grads[0][0], grads[1][0])
        torch.testing.assert_close(grads[2][0], 2.5 * grads[0][0], rtol=1e-15, atol=0)
        assert torch.equal(grads[2][1], grads[0][1])

    def test_single_process_autocast_changes_nothing():
        """Under torch.autocast the loss and gradients of float32 inputs are those
        computed without it (the chunked backend's matmuls used to drop to bfloat16)."""
        x, w, y = make_inputs(9, C_SAMPLED, D, seed=4, ignore_index=IGNORE,
                              dtype=torch.float32)
        out = []
        for autocast in (False, True):
            pfc = PartialFC(D, C_SAMPLED, backend="chunked", ignore_index=IGNORE,
                            label_smoothing=0.1)
            with torch.no_grad():
                pfc.weight.copy_(w)
            xr = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = pfc(xr, y)
            loss.backward()
            out.append((loss.detach(), xr.grad, pfc.weight.grad))
        assert out[1][0].dtype == torch.float32
        torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("world", WORLDS)
    @pytest.mark.parametrize("check", CHECKS + ["after_errors"])
    def test_matches_reference(groups, world, check):
        """loss, local-embedding gradient (world x the true one) and weight-shard gradient
        equal the single-process float64 reference, on every rank."""
        for r, res in enumerate(_rank_results(groups, world)):
            rec = _get(res, check, r)
            if check.endswith("/stats"):
                assert rec["pred_equal"], f"rank {r}: top-1 prediction differs"
                assert rec["max_logit_err"] <= 1e-10, rec
                continue
            for key in ("loss", "dx", "dw"):
                err = rec[key]
                assert not isinstance(err, str), f"rank {r} {check} {key}: {err}"
                assert err <= rec["tol"], f"rank {r} {check} {key}: {err:.3e} > {rec['tol']}"
            if check.endswith("/rate_1"):
                assert rec["weight_index_is_none"]
            if "sampl" in check or "/rate_0" in check:
                assert rec["positives_sampled"], f"rank {r}: a positive class was not sampled"
                assert rec["dw_zero_outside"], f"rank {r}: dW nonzero outside sampled rows"
                assert rec["sorted"]
                if "positives_only" in check:
                    assert rec["num_sample"] == 0, rec
                if "all_classes" in check:
                    assert rec["index_is_all"], rec
                else:  # num_sample classes, or only the positives if there are more
                    assert rec["num_sampled"] == max(rec["num_sample"],
                                                     rec["num_positives"]), rec

    EXPECT = {
        "label_too_big": (r"rank\(s\) \[{last}\] out of range.*\[0, 11\).*got 11",),
        "label_negative": (r"rank\(s\) \[0\] out of range.*got -5",),
        "batch_size_differs": (r"local batch size N must be the same on every rank, got "
                               r"\[6, 5",),
        "weight_shape": (r"rank\(s\) \[1\].*weight has shape \(\d+, 7\)",),
        "num_classes_differs": (r"class sharding differs.*num_classes.*\[12, 11",),
        "dtype_differs": (r"dtype must be the same on every rank.*float32",),
        "labels_float": (r"rank\(s\) \[0\].*integer tensor.*float32",),
    }

    @pytest.mark.parametrize("world", WORLDS)
    @pytest.mark.parametrize("case", BAD_INPUTS)
    def test_bad_input_raises_on_every_rank(groups, world, case):
        import re
        pattern = EXPECT[case][0].format(last=world - 1)
        for r, res in enumerate(_rank_results(groups, world)):
            rec = _get(res, f"bad/{case}", r)
            assert rec["raised"] is not None, f"rank {r}: {case} did not raise"
            assert re.search(pattern, rec["msg"]), f"rank {r}: {rec['msg']!r} !~ {pattern!r}"

    def test_process_group_is_a_subgroup(groups):
        res = _rank_results(groups, 3)
        assert _get(res[2], "subgroup", 2) == {"not_member": True}
        for r in (0, 1):
            rec = _get(res[r], "subgroup", r)
            for key in ("loss", "dx", "dw"):
                assert not isinstance(rec[key], str), f"rank {r} {key}: {rec[key]}"
                assert rec[key] <= rec["tol"], f"rank {r} subgroup {key}: {rec[key]:.3e}"

    @pytest.mark.parametrize("world", WORLDS)
    def test_nan_in_nan_out(groups, world):
        for r, res in enumerate(_rank_results(groups, world)):
            assert _get(res, "nan_in_nan_out", r)["loss_is_nan"], f"rank {r}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
