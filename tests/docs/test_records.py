"""The record library: schema validation, write_record, rendering, the block replacement; and the
job that regenerates the pages (``jobs/results.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from clusterattack.reports.records import (
    HEADLINE_BEGIN,
    HEADLINE_END,
    RecordError,
    code_provenance,
    format_value,
    load_record,
    load_records,
    mean_std,
    render_headline,
    render_results_page,
    replace_block,
    validate_record,
    write_record,
)

JOB = Path(__file__).resolve().parents[2] / "jobs" / "results.py"


def _results_job():
    spec = importlib.util.spec_from_file_location("results_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROVENANCE = {
    "command": "python jobs/attack.py --victim victim-cc-fashion_mnist --dataset fashion_mnist",
    "commit": "aea70d0",
    "dirty": False,
    "victim_version": 3,
    "dataset": "fashion_mnist",
    "splits": {"pool": 58000, "holdout": 2000, "eval": 10000},
    "recipe": "strong",
    "selection": "label_free",
    "eps": 0.1,
    "norm": "linf",
    "seeds": [0],
    "machine": "1x NVIDIA H100",
    "date": "2026-12-01",
}


def attack_row(victim="cc", source="surrogate", drop=0.9, **extra):
    return {
        "victim": victim,
        "gradient_source": source,
        "image_queries": 575000,
        "calls": 4127,
        "calls_256": 2247,
        "wall_s": 2900.0,
        "metrics": {"nmi_pre": 0.636, "nmi_post": 0.636 * (1 - drop), "nmi_drop": drop},
        **extra,
    }


def test_write_record_round_trips(tmp_path):
    path = write_record(
        "strong-cc", [attack_row(), attack_row(source="estimate", drop=0.95)], PROVENANCE,
        title="Strong recipe on CC", folder=tmp_path, headline=True,
    )
    assert path == tmp_path / "strong-cc.json"
    record = load_record(path)
    assert record.provenance == "full" and record.headline and not record.legacy
    assert [r["gradient_source"] for r in record.rows] == ["surrogate", "estimate"]
    assert record.rows[0]["commit"] == "aea70d0"  # shared provenance merged into every row
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_row_overrides_the_shared_provenance(tmp_path):
    record = load_record(
        write_record("two-seeds", [attack_row(), attack_row(seeds=[1])], PROVENANCE, title="t", folder=tmp_path)
    )
    assert [r["seeds"] for r in record.rows] == [[0], [1]]


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("commit", "not-a-commit", "commit must be a git commit"),
        ("dirty", "no", "dirty must be true or false"),
        ("date", "24/11/2026", "date must be an ISO date"),
        ("norm", "l1", "norm must be one of"),
        ("eps", -0.1, "eps must be a positive number"),
        ("seeds", [], "seeds must be a non-empty list"),
        ("gradient_source", "", "gradient_source must be the attack's gradient source"),
        ("splits", {"pool": -1}, "splits must be a dict"),
    ],
)
def test_malformed_fields_are_named(tmp_path, field, value, expected):
    row = attack_row()
    if field in row:
        row[field] = value
    with pytest.raises(RecordError) as err:
        write_record("bad", [row], {**PROVENANCE, field: value}, title="t", folder=tmp_path)
    assert expected in str(err.value) and "row 0" in str(err.value)
    assert not (tmp_path / "bad.json").exists()


def test_every_missing_field_is_listed_with_its_row(tmp_path):
    provenance = {k: v for k, v in PROVENANCE.items() if k not in ("commit", "machine")}
    row = attack_row()
    del row["calls"]
    with pytest.raises(RecordError) as err:
        write_record("missing", [attack_row(), row], provenance, title="t", folder=tmp_path)
    problems = err.value.problems
    for needle in ("row 0: missing 'commit'", "row 1: missing 'machine'", "row 1: missing 'calls'"):
        assert any(needle in p for p in problems), (needle, problems)
    assert not any("row 0: missing 'calls'" in p for p in problems)


def test_several_seeds_need_mean_and_std(tmp_path):
    rows = [attack_row(seeds=[0, 1])]
    with pytest.raises(RecordError, match="nmi_drop is a single number but the row has 2 seeds"):
        write_record("seeds", rows, PROVENANCE, title="t", folder=tmp_path)
    rows[0]["metrics"] = {k: mean_std([v, v - 0.01]) for k, v in rows[0]["metrics"].items()}
    record = load_record(write_record("seeds", rows, PROVENANCE, title="t", folder=tmp_path))
    assert record.rows[0]["metrics"]["nmi_drop"]["n"] == 2
    rows[0]["metrics"]["nmi_pre"] = mean_std([0.6, 0.6, 0.6])
    with pytest.raises(RecordError, match="has n=3 but the row has 2 seeds"):
        write_record("seeds", rows, PROVENANCE, title="t", folder=tmp_path)


def test_calls_of_256_must_match_the_image_queries(tmp_path):
    with pytest.raises(RecordError, match="calls_256 is 2000 but 575000 image-queries make 2247"):
        write_record("calls", [attack_row(calls_256=2000)], PROVENANCE, title="t", folder=tmp_path)


def test_mean_std():
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    stat = mean_std([0.2, 0.4])
    assert stat["mean"] == pytest.approx(0.3) and stat["std"] == pytest.approx(0.1414, abs=1e-4)
    with pytest.raises(ValueError, match="finite values"):
        mean_std([])


def test_legacy_records_need_a_source_and_list_what_they_lack(tmp_path):
    rows = [{"victim": "cc", "gradient_source": "surrogate", "metrics": {"nmi_drop": 0.75}}]
    with pytest.raises(RecordError, match="a legacy record needs a source"):
        write_record("old", rows, {"provenance": "legacy", "date": "2026-11-22"}, title="t", folder=tmp_path)
    path = write_record(
        "old", rows, {"provenance": "legacy", "source": "README.md at commit 78a1019", "date": "2026-11-22"},
        title="Old", folder=tmp_path,
    )
    record = load_record(path)
    assert record.legacy
    assert {"command", "commit", "image_queries"} <= set(record.missing_fields())


def test_file_name_must_be_the_id(tmp_path):
    path = write_record("right", [attack_row()], PROVENANCE, title="t", folder=tmp_path)
    path.rename(tmp_path / "wrong.json")
    with pytest.raises(RecordError, match="must equal the file name's stem 'wrong'"):
        load_record(tmp_path / "wrong.json")


def test_unknown_top_level_keys_and_schema_are_refused():
    with pytest.raises(RecordError) as err:
        validate_record({"schema": 2, "id": "x", "title": "t", "provenance": "full", "rows": [], "extra": 1})
    text = str(err.value)
    assert "unknown top-level keys ['extra']" in text and "schema must be 1" in text and "rows must be" in text


def test_full_and_legacy_records_are_never_in_one_table(tmp_path):
    write_record("new", [attack_row()], PROVENANCE, title="New table", folder=tmp_path, headline=True)
    write_record(
        "old", [{"victim": "cc", "metrics": {"nmi_drop": 0.75}, "run_id": "f6d8cbfe"}],
        {"provenance": "legacy", "source": "README", "date": "2026-11-22"},
        title="Old table", folder=tmp_path, headline=True,
        columns=[("victim", "victim"), ("nmi_drop", "NMI drop"), ("run_id", "run")],
    )
    records = load_records(tmp_path)
    page = render_results_page(records)
    full_at, legacy_at = page.index("## Full provenance"), page.index("## Legacy (provenance incomplete)")
    assert full_at < page.index("### New table") < legacy_at < page.index("### Old table (legacy)")
    headline = render_headline(records)
    assert headline.index("New table") < headline.index("Old table")
    assert "*(legacy record:" in headline.split("Old table", 1)[1]
    assert "f6d8cbfe" not in page and "f6d8cbfe" not in headline  # run ids are never rendered
    assert "| 75.0% |" in page


def test_format_value():
    assert format_value("nmi_drop", 0.9934) == "99.3%"
    assert format_value("image_queries", 575000) == "575,000"
    assert format_value("nmi_post", 0.0042) == "0.004"
    assert format_value("nmi_post", {"mean": 0.1, "std": 0.02, "n": 3}) == "0.100 ± 0.020 (n=3)"
    assert format_value("setting", "a|b") == "a\\|b"
    assert format_value("nmi_post", None) == "-"
    assert format_value("eps", 0.05) == "0.05"
    assert format_value("attack_wall_s", {"mean": 548.55, "std": 1.3435, "n": 2}) == "549 ± 1.3 (n=2)"
    assert format_value("wall_s", 1320.4) == "1,320" and format_value("pretext_s", 0.25) == "0.2"


def test_replace_block():
    text = f"intro\n{HEADLINE_BEGIN}\nold\n{HEADLINE_END}\nrest\n"
    assert replace_block(text, "new\n") == f"intro\n{HEADLINE_BEGIN}\nnew\n{HEADLINE_END}\nrest\n"
    with pytest.raises(ValueError, match="expected the markers"):
        replace_block("no markers here", "new")


def test_cli_check_and_write(tmp_path, capsys):
    main = _results_job().main
    results = tmp_path / "results"
    write_record("new", [attack_row()], PROVENANCE, title="New table", folder=results, headline=True)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{HEADLINE_BEGIN}\n{HEADLINE_END}\n", encoding="utf-8")
    page = tmp_path / "results.md"
    args = ["--results-dir", str(results), "--page", str(page), "--readme", str(readme)]
    assert main([*args, "--check"]) == 1
    assert "stale:" in capsys.readouterr().out and not page.exists()
    assert main(args) == 0
    assert main([*args, "--check"]) == 0
    assert "New table" in readme.read_text(encoding="utf-8")
    (results / "broken.json").write_text(json.dumps({"schema": 1}), encoding="utf-8")
    assert main([*args, "--check"]) == 2
    assert "broken.json" in capsys.readouterr().err


def test_code_provenance_reads_the_runs_source_tags(tmp_path):
    tags = {"clusterattack.git_commit": "a" * 40, "clusterattack.git_dirty": "true",
            "clusterattack.git_diff": "0123456789ab", "mlflow.runName": "x"}
    assert code_provenance(tags) == {"commit": "a" * 40, "dirty": True, "diff": "0123456789ab"}
    clean = code_provenance({"clusterattack.git_commit": "b" * 40, "clusterattack.git_dirty": "false"})
    record = load_record(write_record("tagged", [attack_row()], {**PROVENANCE, **clean}, title="t", folder=tmp_path))
    assert record.rows[0]["commit"] == "b" * 40 and record.rows[0]["dirty"] is False
    with pytest.raises(ValueError, match="clusterattack.git_commit"):
        code_provenance({"mlflow.source.git.commit": "c" * 40})
