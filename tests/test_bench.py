"""Tests of the benchmark harness itself (bench/), on tiny shapes: it runs, the CSV has
its columns and sane numbers, providers that cannot run are skipped with a message, bad
options are refused, and the plots and summary are written."""
from __future__ import annotations

import csv
import os

import pytest
import torch

from bench import harness, plots, run
from bench.providers import PeerProvider, Problem, all_providers, parse_dtype, \
    select_providers

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes on a shared CPU: one intra-op thread avoids waiting on a descheduled
    second thread at every op (100x slower calls were seen with two busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(c=96, **kw):
    return Problem(16, c, 8, torch.float32, CPU, **kw)


def fast_sweep(problems, names, modes=("full",), tmp_path=None, **kw):
    csv_path = None if tmp_path is None else os.path.join(tmp_path, "t.csv")
    rows = harness.run_sweep(problems, select_providers(list(names)), list(modes),
                             csv_path=csv_path, rounds=1, min_time_s=0.002,
                             progress=False, matmul=1.0, log=lambda s: None, **kw)
    return rows, csv_path


def test_sweep_writes_csv_with_all_columns_and_sane_values(tmp_path):
    rows, path = fast_sweep([tiny()], ["reference", "chunked"],
                            modes=harness.MODES, tmp_path=tmp_path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == harness.COLUMNS
        got = list(reader)
    assert len(got) == len(rows) == 2 * len(harness.MODES)
    for r in harness.read_csv(path):
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["time_q20_ms"] <= r["time_ms"] <= r["time_q80_ms"]
        assert r["n_timed"] >= 1
        assert r["peak_mem_mib"] > 0
        assert 0 <= r["workspace_mib"] <= r["peak_mem_mib"]
        assert r["gflop"] == pytest.approx(
            harness.model_flops(r["mode"], 16, 96, 8) / 1e9, rel=1e-3)
        assert r["tflops"] > 0
    ref = [r for r in harness.read_csv(path) if r["provider"] == "reference"]
    assert all(r["time_vs_reference"] == 1.0 and r["mem_vs_reference"] == 1.0 for r in ref)


def test_memory_separates_materializing_reference_from_chunked():
    # fwd+bwd at C = 4096: the reference holds about five 16 x 4096 fp32 copies of the
    # logits at once, chunked about two and a half (its one chunk covers all 4096
    # classes here): the measured workspace must show the difference
    p = Problem(16, 4096, 8, torch.float32, CPU)
    inp_bytes_logits = 16 * 4096 * 4
    rows = harness.run_problem(p, select_providers(["reference", "chunked"]), ["full"],
                               rounds=1, min_time_s=0.002, log=lambda s: None)
    ws = {r["provider"]: r["workspace_mib"] * 2**20 for r in rows}
    assert ws["reference"] >= 4 * inp_bytes_logits
    assert ws["chunked"] < 0.75 * ws["reference"]


def test_provider_not_installed_is_skipped_with_message(tmp_path):
    class Missing(PeerProvider):
        name = "missing_peer"
        module = "surely_not_an_installed_module_xyz"
        pip_name = "surely-not-installed"
        needs_cuda = False

    rows = harness.run_problem(tiny(), [Missing(), all_providers()["reference"]], ["full"],
                               rounds=1, min_time_s=0.002, log=lambda s: None)
    miss = [r for r in rows if r["provider"] == "missing_peer"]
    assert len(miss) == 1 and miss[0]["status"] == "skipped"
    assert "not installed" in miss[0]["message"] and "surely-not-installed" in \
        miss[0]["message"]
    assert miss[0]["time_ms"] == ""
    assert [r["status"] for r in rows if r["provider"] == "reference"] == ["ok"]


def test_every_provider_either_runs_or_says_why_not_on_cpu():
    p = tiny()
    for name, prov in all_providers().items():
        reason = prov.skip_reason(p)
        assert reason is None or (isinstance(reason, str) and reason), name
        if name in ("cce", "liger") and not torch.cuda.is_available():
            assert reason is not None  # CUDA-only peers
        if name in ("reference", "chunked"):
            assert reason is None


def test_failing_provider_gives_error_rows_not_a_crash():
    from bench.providers import Bound, Provider

    class Broken(Provider):
        name = "broken"

        def bind(self, p, inp):
            def boom():
                raise RuntimeError("kernel exploded")
            return Bound(boom, [inp.x, inp.w])

    rows = harness.run_problem(tiny(), [Broken()], ["forward", "full"], rounds=1,
                               min_time_s=0.002, log=lambda s: None)
    assert [r["status"] for r in rows] == ["error", "error"]
    assert all("kernel exploded" in r["message"] for r in rows)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        select_providers(["reference", "nope"])
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="mode"):
        harness.model_flops("sideways", 1, 1, 1)
    with pytest.raises(ValueError, match="C must be a positive int"):
        Problem(4, 0, 4, torch.float32, CPU)
    with pytest.raises(ValueError, match="rounds"):
        harness.run_problem(tiny(), [], ["full"], rounds=0)
    with pytest.raises(SystemExit):
        run.main(["--modes", "sideways", "--no-matmul"])


def test_flops_and_stats():
    assert harness.model_flops("full", 2, 3, 5) == 8 * 30
    assert harness.model_flops("forward", 2, 3, 5) == 2 * 30
    assert harness.model_flops("backward", 2, 3, 5) == 6 * 30
    st = harness.stats_from_times([5.0, 1.0, 3.0, 2.0, 4.0])
    assert st.median_ms == 3.0 and st.q20_ms == pytest.approx(1.8) and st.n == 5


def test_cli_smoke_writes_csv_plot_json_and_summary(tmp_path, capsys):
    rc = run.main(["--preset", "smoke", "--device", "cpu", "--providers",
                   "reference,chunked,cce", "--modes", "full", "--rounds", "1",
                   "--min-time", "0.002", "--no-matmul", "--quiet", "--out", str(tmp_path),
                   "--tag", "t"])
    assert rc == 0
    names = set(os.listdir(tmp_path))
    assert {"t.csv", "t.json", "t.md", "t_full_N64_D32.png"} <= names
    assert os.path.getsize(tmp_path / "t_full_N64_D32.png") > 1000
    md = (tmp_path / "t.md").read_text()
    assert "| chunked |" in md and "cce: skipped" in md
    out = capsys.readouterr().out
    assert out.rstrip().endswith(md.rstrip().splitlines()[-1])  # the table comes last


def test_plots_need_two_values_of_c(tmp_path):
    rows, _ = fast_sweep([tiny(64), tiny(128)], ["reference"])
    paths = plots.plot_results(rows, str(tmp_path), "p")
    assert len(paths) == 1 and os.path.exists(paths[0])
    assert plots.plot_results(rows[:1], str(tmp_path), "q") == []


def test_headline_targets_are_judged():
    row = dict(provider="chunked", status="ok", device="cpu", dtype="fp32", N=1024,
               C=65536, D=128, mode="full", loss="arcface", time_vs_reference=0.8,
               mem_vs_reference=0.2)
    assert "time met" in run._target_note(row) and "memory MISSED" in run._target_note(row)
    row["C"] = 4096
    assert run._target_note(row) == ""


def test_append_merges_runs_and_recomputes_ratios(tmp_path):
    common = ["--preset", "smoke", "--device", "cpu", "--modes", "full", "--shapes",
              "16x64x8", "--rounds", "1", "--min-time", "0.002", "--no-matmul", "--quiet",
              "--no-plot", "--out", str(tmp_path), "--tag", "a"]
    assert run.main(common + ["--providers", "reference"]) == 0
    assert run.main(common + ["--providers", "chunked", "--append"]) == 0
    rows = harness.read_csv(str(tmp_path / "a.csv"))
    assert sorted(r["provider"] for r in rows) == ["chunked", "reference"]
    chunked = next(r for r in rows if r["provider"] == "chunked")
    assert chunked["time_vs_reference"] > 0 and chunked["mem_vs_reference"] > 0


def test_backend_with_chunk_size_is_a_provider():
    provs = select_providers(["chunked:32", "reference", "chunked"])
    assert [p.name for p in provs] == ["chunked:32", "chunked", "reference"]
    rows = harness.run_problem(tiny(), provs[:1], ["full"], rounds=1, min_time_s=0.002,
                               log=lambda s: None)
    assert rows[0]["status"] == "ok" and rows[0]["provider"] == "chunked:32"
    with pytest.raises(ValueError, match="chunk size"):
        select_providers(["chunked:zero"])
    with pytest.raises(ValueError, match="unknown"):
        select_providers(["reference:4"])
