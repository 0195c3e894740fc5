"""The command line: ``arcface-kernels info`` / ``demo`` and the demo's measurements."""
import json
import os
import subprocess
import sys

import pytest
import torch

from arcface_kernels import cli, demo
from arcface_kernels.backends import ALL_BACKENDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=240):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user would run it
    return subprocess.run([sys.executable, "-m", "arcface_kernels", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_info_names_every_backend_extension_and_devices(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ALL_BACKENDS:
        line = [ln for ln in out.splitlines() if ln.strip().startswith(name + " ")]
        assert line, f"backend {name} missing from info:\n{out}"
        assert ("ok (" in line[0]) or ("unavailable:" in line[0]), line[0]
    assert f"torch {torch.__version__}" in out
    assert "C++ extension" in out and "built:" in out
    assert "cpu:" in out and "cuda" in out
    assert "backend 'auto' picks:" in out


def test_console_script_info():
    script = os.path.join(os.path.dirname(sys.executable), "arcface-kernels")
    if not os.path.exists(script):
        pytest.skip("the arcface-kernels console script is not installed in this env")
    r = subprocess.run([script, "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("arcface-kernels ") and "backends:" in r.stdout


def test_info_reports_extension_build_as_the_extension_says():
    ext = cli.extension_info()
    try:
        from arcface_kernels import _C
    except (ImportError, OSError):
        assert ext["built"] == "no" and ext["detail"]
    else:
        assert ext["built"] == "yes"
        assert ext["cuda"] == ("yes" if getattr(_C, "WITH_CUDA", 0) else "no")


def test_import_stays_light():
    # Only what arcface_kernels adds on top of torch counts (torch may import tqdm itself).
    code = ("import sys, torch; before = set(sys.modules); "
            "import arcface_kernels, arcface_kernels.cli, arcface_kernels.demo; "
            "heavy = [m for m in ('matplotlib', 'tqdm', 'triton') "
            "         if m in sys.modules and m not in before]; "
            "assert not torch.cuda.is_initialized(); print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_demo_tiny_learns_prints_table_and_writes_plot(tmp_path):
    png, js = tmp_path / "plots" / "curves.png", tmp_path / "res.json"
    r = _run(["demo", "--classes", "2000", "--steps", "30", "--batch", "128", "--dim", "32",
              "--margin", "0.3", "--margin-warmup", "0", "--seed", "3", "--no-progress",
              "--out", str(png), "--json", str(js)])
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    # The table: header, our row on the backend auto picked, the reference row.
    assert "steps/s" in out and "loss-step peak memory" in out
    res = json.loads(js.read_text())
    backend = res["backend"]
    assert backend in ALL_BACKENDS
    assert any(ln.startswith("ArcFaceLoss") and backend in ln for ln in out.splitlines())
    assert any(ln.startswith("naive reference") for ln in out.splitlines())
    # It learns: accuracy rises, loss falls (fixed margin, so the loss is comparable).
    acc, loss = res["history"]["acc"], res["history"]["loss"]
    assert len(acc) == len(loss) == 30
    assert sum(acc[-5:]) / 5 > sum(acc[:5]) / 5 + 0.2, acc
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:5]) / 5, loss
    assert res["heldout_recent_acc"] > 0.2
    # Memory: both measured, the reference holds at least one N x C float32 matrix.
    assert res["reference_estimated"] is False
    assert res["reference_peak_bytes"] >= 128 * 2000 * 4
    assert 0 < res["kernel_peak_bytes"]
    # The plot.
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in out


@pytest.mark.parametrize("flags, value", [
    (["--classes", "0"], "'0'"),
    (["--classes", "lots"], "'lots'"),
    (["--classes", "1"], "1"),
    (["--batch", "-4"], "'-4'"),
    (["--dim", "1.5"], "'1.5'"),
    (["--steps", "0"], "'0'"),
    (["--lr", "-0.1"], "'-0.1'"),
    (["--lr", "nan"], "'nan'"),
    (["--backend", "fastest"], "'fastest'"),
    (["--device", "tpu"], "'tpu'"),
    (["--margin", "4"], "'4'"),
])
def test_bad_demo_flags_error_naming_the_value(capsys, flags, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert value in err and flags[0] in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_demo_on_cuda_without_cuda_errors_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--device", "cuda", "--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and "'cuda'" in err and "not available" in err


def test_unavailable_backend_errors_with_reason(capsys):
    from arcface_kernels.backends import available_backends
    missing = [b for b in ALL_BACKENDS if b not in available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--backend", missing[0], "--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--backend" in err and repr(missing[0]) in err and "unavailable" in err


def test_missing_command_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_demo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="classes.*-1"):
        demo.DemoConfig(classes=-1)
    with pytest.raises(ValueError, match="margin.*5"):
        demo.DemoConfig(margin=5.0)
    with pytest.raises(ValueError, match="working_set.*-2"):
        demo.DemoConfig(working_set=-2)


def test_working_set_slides_and_repeats_classes():
    cfg = demo.DemoConfig(classes=1000, batch=64, repeats=8, working_set=128)
    data = demo.SyntheticClasses(cfg.classes, seed=0, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    first = data.working_set_labels(0, cfg, g)
    assert first.shape == (64,) and first.dtype == torch.int64
    assert set(first.tolist()) <= set(data.current(0, cfg).tolist())
    # Consecutive working sets overlap by window - stride classes.
    a, b = set(data.current(0, cfg).tolist()), set(data.current(1, cfg).tolist())
    assert len(a & b) == cfg.window - cfg.stride
    x = data.sample(first, g)
    assert x.shape == (64, demo.FEATURE_DIM) and torch.isfinite(x).all()
    # Same seed, same data; samples of one class are closer to each other than to others.
    again = demo.SyntheticClasses(cfg.classes, seed=0, device=torch.device("cpu"))
    assert torch.equal(again.prototypes, data.prototypes)
    lab = torch.tensor([5] * 8 + [6] * 8)
    xs = data.sample(lab, g)
    d = torch.cdist(xs, xs)
    assert d[:8, :8].mean() < d[:8, 8:].mean()


def test_measure_memory_measures_then_estimates_the_reference(monkeypatch):
    torch.manual_seed(0)
    n, c, dim = 32, 3000, 8
    head = demo.ArcFaceLoss(dim, c, s=32.0, m2=0.3)
    emb = torch.randn(n, dim)
    labels = torch.randint(0, c, (n,))
    m = demo.measure_memory(head, emb, labels, torch.device("cpu"))
    assert m["reference_note"] == "measured" and not m["reference_estimated"]
    assert m["reference_peak"] >= n * c * 4      # at least the N x C logits
    assert m["kernel_peak"] > 0
    assert head.weight.grad is None              # measurement leaves no gradient behind
    # Too little memory for the full reference: measured at fewer classes and scaled.
    fake_avail = n * 4 * 8 * 1000 / demo.REFERENCE_MEMORY_FRACTION
    monkeypatch.setattr(demo, "available_bytes", lambda device: int(fake_avail))
    e = demo.measure_memory(head, emb, labels, torch.device("cpu"))
    assert e["reference_estimated"] and "C=1000" in e["reference_note"]
    assert 0.5 * m["reference_peak"] < e["reference_peak"] < 2.0 * m["reference_peak"]


# ------------------------------------------------------------------ packaging, extras
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_has_one_source_and_a_flag():
    import importlib.metadata
    import arcface_kernels
    from arcface_kernels._version import __version__
    assert arcface_kernels.__version__ == __version__
    assert importlib.metadata.version("arcface-kernels") == __version__
    r = _run(["--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"arcface-kernels {__version__}"
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        text = f.read()
    assert 'dynamic = ["version"]' in text and '__version__ = "' not in text
    assert 'license = "Apache-2.0"' in text


def test_license_and_py_typed_ship():
    with open(os.path.join(REPO, "LICENSE")) as f:
        assert "Apache License" in f.read(400)
    import arcface_kernels
    assert os.path.exists(os.path.join(os.path.dirname(arcface_kernels.__file__), "py.typed"))


# Runs a command with matplotlib and tqdm made unimportable, as after a plain
# `pip install .` (torch only).
_NO_EXTRAS = ("import sys; sys.modules['matplotlib'] = None; sys.modules['tqdm'] = None; "
              "from arcface_kernels.cli import main; sys.exit(main(sys.argv[1:]))")


def test_demo_without_extras_prints_its_table_and_says_why_no_plot(tmp_path):
    png = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-c", _NO_EXTRAS, "demo", "--steps", "5",
                        "--classes", "500", "--batch", "32", "--dim", "16", "--out",
                        str(png)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TRITON_INTERPRET="0"), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps/s" in r.stdout and "ArcFaceLoss" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if "matplotlib is not installed" in ln]
    assert len(lines) == 1 and "arcface-kernels[demo]" in lines[0]
    assert not png.exists()
    # no profiler chatter from the memory measurement (kineto's native prints)
    assert "USDT" not in r.stderr and "profiler_start" not in r.stderr


def test_demo_uses_torch_default_threads_and_auto_device():
    from arcface_kernels.demo import DemoConfig, resolve_device
    assert DemoConfig().device == "auto" and DemoConfig().threads == 0
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert not hasattr(demo, "choose_threads")


def test_bench_writes_to_the_current_directory_and_leaves_the_checkout_alone(tmp_path):
    def status():
        return subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                              capture_output=True, text=True).stdout
    if not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    before = status()
    r = subprocess.run([sys.executable, "-c", _NO_EXTRAS, "bench", "--preset", "smoke",
                        "--providers", "chunked,reference", "--no-memory", "--no-matmul",
                        "--modes", "full"], capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path), env=dict(os.environ, TRITON_INTERPRET="0"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "arcface-bench"
    assert sorted(p.name for p in out.iterdir()) == ["cpu_fp32.csv", "cpu_fp32.json",
                                                      "cpu_fp32.md"]
    assert "matplotlib is not installed" in r.stdout
    assert status() == before


def test_bench_busy_processes_are_killed():
    from arcface_kernels.bench import run as brun
    with brun.busy_processes(2):
        kids = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "while True"],
                              capture_output=True, text=True).stdout.split()
        assert len(kids) == 2
    # killed and reaped on leaving the block
    assert subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "while True"],
                          capture_output=True).returncode == 1


def test_auto_warns_once_when_a_backend_fails_to_load(monkeypatch):
    import warnings
    from arcface_kernels import backends
    monkeypatch.setattr(backends, "_LOADED", {k: v for k, v in backends._LOADED.items()
                                              if k != "cpp"})
    monkeypatch.setattr(backends, "_LOAD_ERRORS", {"cpp": "ImportError: no _C here"})
    monkeypatch.setattr(backends, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match=r"uses 'chunked' on cpu.*'cpp'.*no _C here"):
        assert backends.resolve_backend("auto", torch.device("cpu")).name == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.resolve_backend("auto", torch.device("cpu"))   # once only
    assert "no _C here" in backends.backend_status()["cpp"]


def test_shadowing_is_named(monkeypatch, tmp_path):
    """An installed copy with the extension, imported from a source tree without it."""
    import importlib.metadata
    from arcface_kernels import backends
    so = tmp_path / "site" / "arcface_kernels" / "_C.cpython-311-x86_64-linux-gnu.so"
    so.parent.mkdir(parents=True)
    so.write_bytes(b"")

    class F(str):
        def locate(self):
            return so

    class Dist:
        files = [F("arcface_kernels/__init__.py"), F("arcface_kernels/" + so.name)]
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    note = backends._shadowing_note()
    assert "shadows the installed package" in note and str(so.parent) in note


def test_the_design_is_in_the_repo():
    """docs/design.md exists, and no tracked file points at a design document outside
    the repository."""
    assert os.path.exists(os.path.join(REPO, "docs", "design.md"))
    if not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "grep", "-n", "-I", "-F", "-e", "../shared", "-e",
                          "shared/design", "--", ".", ":!bench/results"], cwd=REPO,
                         capture_output=True, text=True)
    hits = [ln for ln in out.stdout.splitlines() if not ln.startswith("tests/test_cli.py")]
    assert hits == [], hits
