"""benchmarks/attack_budget.py end to end on a tiny registered victim: its files, and --resume."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from tests.attacks.conftest import load_benchmark

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """The benchmark's main() calls logging.basicConfig, as a script does: its handler writes to
    the stderr pytest captured for this test, closed after it, so later tests in this worker
    would log into a closed stream. Take it off again."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def _train_tiny_cc(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_victims", JOBS / "train_victims.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--model", "cc", "--dataset", "digits", "--epochs", "1", "--train-limit", "256",
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    assert job.main(argv) == 0


@pytest.mark.slow
def test_a_resumed_run_keeps_what_matches_and_runs_again_what_changed(mlflow_uri, tmp_path, capsys):
    _train_tiny_cc(tmp_path)
    bench = load_benchmark("attack_budget")
    out = tmp_path / "bench"
    argv = ["--victims", "cc", "--dataset", "digits", "--recipes", "default", "--seeds", "0", "--threads", "1",
            "--set", "epochs=2", "--set", "train_limit=256", "--set", "surrogate.distill_queries=256",
            "--set", "surrogate.refresh_rounds=0", "--n-test", "128", "--out", str(out), "--quiet"]  # fmt: skip
    assert bench.main(argv) == 0
    first = capsys.readouterr().out
    path = out / "cc-default-s0.json"
    saved = json.loads(path.read_text())
    assert "kept from" not in first and len(saved["curve"]) == 2
    assert saved["image_queries"] > 0 and len(saved["commit"]) in (0, 40)
    assert saved["linf_max"] <= 0.1 + 1e-6  # the benchmark's default eps bounds every image

    assert bench.main([*argv, "--resume"]) == 0
    kept = capsys.readouterr().out
    assert f"(kept from {path})" in kept
    assert json.loads(path.read_text()) == saved  # the file was not written again
    # The table is rebuilt from the kept run: its queries, not a fresh attack's.
    assert f"{saved['image_queries']:,}" in kept

    # Another attack config under the same name is run again, not passed off as the old one.
    assert bench.main([*argv, "--resume", "--set", "alpha_c=0.5"]) == 0
    again = capsys.readouterr().out
    assert "kept from" not in again
    assert json.loads(path.read_text())["config"]["alpha_c"] == 0.5

    # The white-box reference: the same schedule with the victim's own gradient, labelled, no goal.
    assert bench.main([*argv, "--gradient-source", "whitebox", "--out", str(tmp_path / "wb")]) == 0
    label = "default+gradient_source=whitebox+epochs=2+train_limit=256+surrogate.distill_queries=256+" \
        "surrogate.refresh_rounds=0"
    assert f"{label}: the white-box reference" in capsys.readouterr().out
    reference = json.loads((tmp_path / "wb" / "cc-default-s0.json").read_text())
    assert reference["config"]["gradient_source"] == "whitebox" and reference["recipe"] == label

    # Runs of separate invocations gathered into one table, each named by what sets it apart.
    first_dir = tmp_path / "first"
    first_dir.mkdir()
    (first_dir / "cc-default-s0.json").write_text(json.dumps(saved))
    # A second seed made by other code (as a run resumed across commits would have it).
    other = "1234567" + "0" * 33
    (first_dir / "cc-default-s1.json").write_text(json.dumps({**saved, "seed": 1, "commit": other}))
    records = tmp_path / "records"
    assert bench.main(["--dataset", "digits", "--n-test", "128", "--out", str(tmp_path / "all"), "--quiet",
                       "--collect", str(first_dir), "--collect", str(out), "--collect", str(tmp_path / "wb"),
                       "--record", "budget-mixed", "--record-dir", str(records), "--record-headline",
                       "--record-note", "Two seeds from two commits.", "--record-title", "Seeds from two commits"]) == 0  # fmt: skip
    table = (tmp_path / "all" / "attack_budget.md").read_text()
    assert "| default | 0,1 |" in table and "| default+alpha_c=0.5 | 0 |" in table
    assert "| default+gradient_source=whitebox | 0 |" in table
    record = json.loads((records / "budget-mixed.json").read_text())
    assert record["headline"] is True and record["description"].endswith(" Two seeds from two commits.")
    assert record["title"] == "Seeds from two commits"
    assert record["description"].startswith(
        "Surrogate and whitebox modes (white-box rows: the reference, the victim's own gradient; its forward "
        "and backward passes counted as image-queries), L-inf eps 0.1, 128 test images scored."
    )
    assert record["common"]["gradient_source"] == "surrogate, whitebox"
    # The command as given to main() (not the test runner's), quoted, the note left to the description.
    command = record["common"]["command"]
    assert command.startswith("python benchmarks/attack_budget.py --dataset digits ") and "--collect" in command
    assert "--record budget-mixed" in command and "Two seeds" not in command and "--record-note" not in command
    mixed = next(r for r in record["rows"] if r["recipe"] == "default")
    # Each seed's code is named in the row, the first seed's as its commit.
    assert mixed["seeds"] == [0, 1] and mixed["code"] == f"{saved['commit'][:7] or 'unknown'}, 1234567"
    if saved["commit"]:
        assert mixed["commit"] == saved["commit"]
    assert (tmp_path / "all" / "attack_budget.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no run files"):
        bench.main(["--dataset", "digits", "--out", str(tmp_path / "x"), "--collect", str(tmp_path / "empty")])


def test_a_record_name_that_cannot_be_a_file_name_is_refused_before_any_work(capsys):
    bench = load_benchmark("attack_budget")
    with pytest.raises(SystemExit):
        bench.parse_args(["--record", "../elsewhere"])
    assert "--record '../elsewhere'" in capsys.readouterr().err
    assert bench.parse_args(["--record"]).record == ""  # the default name, attack_budget_<dataset>
    assert bench.parse_args(["--record", "strong-vs-fast"]).record == "strong-vs-fast"
    with pytest.raises(SystemExit):
        bench.parse_args(["--record-note", "shared cores"])
    assert "go with --record" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--record-title", "a screen"])
    assert "--record-title go with --record" in capsys.readouterr().err
