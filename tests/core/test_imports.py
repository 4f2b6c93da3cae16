"""The package imports with torchvision absent or broken (it is broken next to CPU torch here)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import clusterattack
    names = [m.name for m in pkgutil.walk_packages(clusterattack.__path__, "clusterattack.")]
    for name in names:
        importlib.import_module(name)
    assert "torchvision" not in sys.modules or sys.modules["torchvision"] is None
    print(len(names))
    """
)


def test_every_module_imports_with_a_broken_torchvision(tmp_path):
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist (broken CUDA build)')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) >= 3
