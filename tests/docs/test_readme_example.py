"""The README's Python example runs as printed and attacks its victim."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.docs.doc_blocks import ROOT, fenced_blocks

pytestmark = pytest.mark.slow  # trains a small generator: 10-30 s on one core


def test_readme_python_example_runs(tmp_path):
    blocks = [b for b in fenced_blocks(ROOT / "README.md") if b.lang == "python"]
    assert len(blocks) == 1, f"expected one Python example in README.md, found {len(blocks)}"
    script = tmp_path / "example.py"
    script.write_text(blocks[0].text + "\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLUSTERATTACK_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"NMI (\d\.\d+) -> (\d\.\d+) with ([\d,]+) image-queries in (\d+) calls", done.stdout)
    assert match, done.stdout
    before, after = float(match.group(1)), float(match.group(2))
    queries = int(match.group(3).replace(",", ""))
    assert after < before - 0.05, f"the example's attack did not lower NMI: {before} -> {after}"
    assert 0 < queries <= 50_000  # within the CountingVictim's budget
