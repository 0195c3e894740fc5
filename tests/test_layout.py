"""The installed layout: the Triton kernels install as arcface_kernels.triton_kernels, no
top-level ``triton_kernels`` module is installed (triton ships its own package of that
name), and arcface_kernels never imports a top-level ``triton_kernels``."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_kernels_is_a_leaf_package():
    """triton_kernels/ imports nothing from arcface_kernels (only torch and triton)."""
    for name in sorted(os.listdir(os.path.join(REPO, "triton_kernels"))):
        if name.endswith(".py"):
            with open(os.path.join(REPO, "triton_kernels", name)) as f:
                for line in f:
                    stripped = line.strip()
                    if stripped.startswith(("import ", "from ")):
                        assert "arcface_kernels" not in stripped, (name, stripped)


def test_no_clash_with_a_top_level_triton_kernels(tmp_path):
    """With another package named triton_kernels first on the path (as triton's own
    would be), arcface_kernels registers its Triton ops from its own kernels and the
    top-level name stays the other package's."""
    pytest.importorskip("triton")
    pkg = tmp_path / "triton_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("STAND_IN = True\n")
    code = (
        "import sys, arcface_kernels, arcface_kernels._triton as t\n"
        "import triton_kernels\n"
        "assert getattr(triton_kernels, 'STAND_IN', False), triton_kernels.__file__\n"
        "import arcface_kernels.triton_kernels.launch as L\n"
        "assert L.__name__ == 'arcface_kernels.triton_kernels.launch'\n"
        "assert not any(m.startswith('triton_kernels.') for m in sys.modules), "
        "[m for m in sys.modules if m.startswith('triton_kernels')]\n"
        "print('ok', t.FWD_OP)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def test_wheel_has_no_top_level_triton_kernels(tmp_path):
    """pip wheel (pure Python: ARCFACE_NO_EXTENSION=1) installs the kernels under
    arcface_kernels/triton_kernels/ and nothing at the top level."""
    env = dict(os.environ, ARCFACE_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path), REPO],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    wheels = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(os.path.join(tmp_path, wheels[0])).namelist()
    assert "arcface_kernels/triton_kernels/launch.py" in names
    assert "arcface_kernels/triton_kernels/kernels.py" in names
    assert not [n for n in names if n.startswith("triton_kernels/")]
