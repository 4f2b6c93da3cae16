"""The report writer on tiny data: every section, escaping, placeholders, figures that exist (no store)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.figure import Figure

from clusterattack.reports import (
    ANALYSIS_KINDS,
    AnalysisResult,
    ReportData,
    SweepTables,
    default_commands,
    write_report,
)
from clusterattack.reports.breakdown import grid_indices, ordered_confusions
from clusterattack.reports.html import Column, esc, figure_html, fmt, table_html
from tests.reports.helpers import EVIL, cell, full_data, payloads, pca_points, read_page, table_rows

SECTIONS = ("table1", "table2", "confusion", "grid", *ANALYSIS_KINDS)


def test_esc_and_fmt():
    assert esc(EVIL) == "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot;"
    assert fmt(0.64921) == "0.649"
    assert fmt(0.6506, "pct") == "65.1%"
    assert fmt(37000.0, "int") == "37,000"
    assert fmt(None) == fmt(float("nan")) == "\u2014"
    assert fmt("linf", "text") == "linf"


def test_table_keeps_full_values_and_escapes():
    html = table_html([{"name": EVIL, "x": 1 / 3, "nmi_pre": 0.7, "nmi_post": 0.1}],
                      (Column("name", EVIL, "text"), Column("x", "x"), Column("nmi", "NMI", "arrow")))  # fmt: skip
    assert "<script>" not in html
    assert f'data-value="{1 / 3!r}"' in html and ">0.333<" in html
    assert 'data-pre="0.7"' in html and 'data-post="0.1"' in html


def test_bad_column_kind_and_absolute_figure_are_rejected():
    with pytest.raises(ValueError, match="kind must be one of"):
        Column("x", "x", "percent")
    for src in ("https://cdn.example/x.png", "/etc/x.png"):
        with pytest.raises(ValueError, match="relative"):
            figure_html(src, "c")


def test_full_report_has_every_section_filled_and_every_image(tmp_path):
    data = full_data()
    logged = tmp_path / "scores.png"  # a figure the detection run logged: copied in, not redrawn
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    fig.savefig(logged)
    data.analyses["detection"].figure_files = {"scores": logged}
    index = write_report(data, tmp_path / "rep")
    page = read_page(index)
    assert page.sections == {s: True for s in SECTIONS}
    assert page.scripts == 0, "the page must run no script (and load none)"
    # confusion, grid, norm curves, 3 transfer heat maps, PCA, the detection run's own figure, baselines,
    # query detection's keys
    assert len(page.images) == 10 and "figures/detection_scores.png" in page.images
    assert "figures/query_detection.png" in page.images
    qd = payloads()["query_detection"]
    assert cell(page, "query-detection-summary", "flagged_keys") == qd["flagged_keys"]
    assert cell(page, "query-detection", "queries_to_flag") == qd["rows"][0]["queries_to_flag"]
    for src in page.images:
        assert not src.startswith(("/", "http")) and (index.parent / src).is_file(), src
        assert (index.parent / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = index.read_text()
    assert "<script>alert" not in raw and esc(EVIL) in raw
    assert "http://" not in raw and "https://" not in raw
    # every number shown is also in report.json, with the run it came from
    numbers = json.loads((index.parent / "report.json").read_text())
    assert numbers["analyses"]["detection"]["run_id"] == "analysis-detection"
    assert cell(page, "detection", "detection_rate_mean") == pytest.approx(0.1169)
    assert cell(page, "table1", "nmi", 1, "data-pre") == numbers["sweep"]["table1"][1]["nmi_pre"]
    # Table 1 rows carry the query counts of the matching Table 2 row
    assert cell(page, "table1", "image_queries", 1) == 5256


def test_without_a_sweep_every_section_names_the_sweep_command(tmp_path):
    data = ReportData(
        title="empty", tracking_uri="sqlite:///x.db", generated_at="now", dataset="tiny"
    )
    index = write_report(data, tmp_path)
    page = read_page(index)
    assert page.sections == {s: False for s in SECTIONS}
    assert set(page.states.values()) == {"missing"}
    assert page.images == []
    raw = index.read_text()
    assert raw.count("not run yet") >= len(SECTIONS)
    assert raw.count("python jobs/sweep.py --preset demo --analyses all") >= len(SECTIONS)


def test_sweep_sections_say_not_requested_failed_or_never_started(tmp_path):
    """Of a sweep: an analysis it did not ask for names the command that asks; a failed one shows
    what it computed and says what failed; a requested one without a run says it never started."""
    t1, t2 = table_rows()
    detection = payloads()["detection"]
    failed = AnalysisResult(
        "detection", "run-failed", {"items": [], "failed": [{"key": "scan-tiny-surrogate-eps0.1", "error": EVIL}]},
        status="FAILED", error=f"1 item(s) failed: {EVIL}", tags={"clusterattack.git_commit": "c" * 40,
                                                                   "clusterattack.git_dirty": "false"},
    )  # fmt: skip
    failed.items = [AnalysisResult("detection", "run-failed", detection, label="cc-tiny-surrogate-eps0.1",
                                   provenance={"victim": "victim-cc-tiny/1", "generator": "generator-cc-tiny/1",
                                               "generator_run_id": "gen-run-1", "selection": "label_free",
                                               "seeds": "1,2"},
                                   tags=failed.tags)]  # fmt: skip
    data = ReportData(
        title="t", tracking_uri="u", generated_at="now", dataset="tiny",
        sweep=SweepTables("sw", "parent0", t1, t2, {}, {"status": "completed"}),
        analyses={"detection": failed}, requested=("detection", "pca"),
        commands=default_commands("sw", "tiny"),
    )  # fmt: skip
    data.commands["norm_curves"] = f"python jobs/report.py --run-analyses norm_curves {EVIL}"
    index = write_report(data, tmp_path)
    page = read_page(index)
    raw = index.read_text()
    assert page.states["detection"] == "failed" and page.sections["detection"] is False
    # what the failed run did compute is shown, with its provenance, beside what failed and why
    assert cell(page, "detection-cc-tiny-surrogate-eps0.1", "detection_rate_mean") == detection["detection_rate_mean"]
    text = " ".join(page.text)
    for shown in ("run-failed", "scan-tiny-surrogate-eps0.1", EVIL, "victim-cc-tiny/1", "gen-run-1", "c" * 12,
                  "label_free", "1,2"):  # fmt: skip
        assert shown in text, shown
    assert "<script>alert" not in raw
    assert page.states["pca"] == "missing" and "never started" in raw
    assert page.states["norm_curves"] == "not_requested"
    assert f"python jobs/report.py --run-analyses norm_curves {esc(EVIL)}" in raw
    assert page.states["transfer"] == "not_requested"
    assert "python jobs/report.py --sweep sw --run-analyses transfer" in raw
    assert "python jobs/sweep.py --preset tiny --analyses transfer" in raw
    # query detection reads what the sweep's own deployments screened: only a new sweep can ask for it
    assert page.states["query_detection"] == "not_requested"
    assert "python jobs/sweep.py --preset tiny --analyses query_detection" in raw
    assert "--run-analyses query_detection" not in raw
    assert page.states["table1"] == "filled"
    assert json.loads((tmp_path / "report.json").read_text())["analyses"]["detection"]["status"] == "FAILED"


def test_items_of_an_analysis_each_name_their_provenance(tmp_path):
    """A sweep's analysis run holds items (one per row): each gets its own block, table and figure."""
    t1, t2 = table_rows()
    tags = {"clusterattack.git_commit": "d" * 40, "clusterattack.git_dirty": "true", "clusterattack.git_diff": "abc"}
    run = AnalysisResult("pca", "run-pca", {"items": [{}, {}]}, tags=tags)
    for i, key in enumerate(("cc-tiny-surrogate-eps0.1", "cc-tiny-surrogate-eps0.2")):
        item = AnalysisResult("pca", "run-pca", {**payloads()["pca"], "overlap": 0.5 + i / 10}, label=key, tags=tags,
                              provenance={"victim": "victim-cc-tiny/3", "generator": f"generator-cc-tiny/{i + 1}",
                                          "generator_run_id": f"gen{i}", "selection": "oracle", "seeds": "4,5"})  # fmt: skip
        item.arrays = pca_points(i)
        run.items.append(item)
    data = ReportData(
        title="t", tracking_uri="u", generated_at="now", dataset="tiny",
        sweep=SweepTables("sw", "parent0", t1, t2, {}, {}), analyses={"pca": run}, requested=("pca",),
    )  # fmt: skip
    page = read_page(write_report(data, tmp_path))
    assert page.states["pca"] == "filled"
    assert cell(page, "pca-cc-tiny-surrogate-eps0.1", "overlap") == 0.5
    assert cell(page, "pca-cc-tiny-surrogate-eps0.2", "overlap") == pytest.approx(0.6)
    assert {"figures/pca-cc-tiny-surrogate-eps0.1.png", "figures/pca-cc-tiny-surrogate-eps0.2.png"} <= set(page.images)
    text = " ".join(page.text)
    for shown in ("victim-cc-tiny/3", "generator-cc-tiny/2 (run gen1)", "d" * 12 + " (dirty, diff abc)", "oracle", "4,5"):
        assert shown in text, shown


def test_malformed_payload_is_reported_not_raised(tmp_path):
    bad = dict(payloads()["transfer"])
    del bad["post"]
    data = ReportData(title="t", tracking_uri="u", generated_at="now", dataset="tiny",
                      analyses={"transfer": AnalysisResult("transfer", "run-bad", bad)})  # fmt: skip
    page = read_page(write_report(data, tmp_path))
    assert page.sections["transfer"] is False
    assert "run-bad" in "".join(page.text) and "could not be shown" in "".join(page.text)


def test_rewriting_a_folder_drops_stale_figures(tmp_path):
    write_report(full_data(), tmp_path)
    stale = tmp_path / "figures" / "old.png"
    stale.write_bytes(b"x")
    write_report(ReportData(title="t", tracking_uri="u", generated_at="now"), tmp_path)
    assert not stale.exists() and not list((tmp_path / "figures").glob("*.png"))


def test_ordered_confusions_share_the_clean_order():
    labels = np.array([0, 0, 1, 1, 2, 2])
    before = np.array([2, 2, 0, 0, 1, 1])  # class 0 -> cluster 2, class 1 -> 0, class 2 -> 1
    after = np.array([2, 2, 2, 2, 2, 1])
    pre, post, order = ordered_confusions(labels, before, after, 3, 4)
    assert order.tolist() == [2, 0, 1, 3]
    assert np.array_equal(pre[:, :3], np.diag([2, 2, 2])) and pre[:, 3].sum() == 0
    assert post[:, 0].tolist() == [2, 2, 1] and post.sum() == 6


def test_grid_indices_cover_classes_and_are_seeded():
    labels = np.repeat(np.arange(4), 5)
    pick = grid_indices(labels, 6, seed=3)
    assert len(set(pick.tolist())) == 6 and set(labels[pick]) == {0, 1, 2, 3}
    assert np.array_equal(pick, grid_indices(labels, 6, seed=3))
    with pytest.raises(ValueError, match="at least 1"):
        grid_indices(labels, 0, seed=0)


def test_eps_tradeoff_rows_are_shown_under_table1_with_their_runs(tmp_path):
    data = full_data()
    index = write_report(data, tmp_path / "without")
    assert "table3" not in read_page(index).cells  # a sweep from before the table existed
    data.sweep.table3 = [
        {"model": "cc", "dataset": "tiny", "eps": 0.05, "alpha_a": 2.0, "alpha_c": 1.0, "nmi_pre": 0.61,
         "nmi_post": 0.48, "nmi_drop": 0.2131, "epochs_run": 2, "image_queries": 3000, "trial": "t_00003", "run_id": "run7"},
        {"model": "cc", "dataset": "tiny", "eps": 0.1, "alpha_a": 10.0, "alpha_c": 1.0, "nmi_pre": 0.61,
         "nmi_post": 0.21, "nmi_drop": 0.6557, "epochs_run": 3, "image_queries": 5000, "trial": "t_00000", "run_id": "run0"},
    ]  # fmt: skip
    index = write_report(data, tmp_path / "with")
    page = read_page(index)
    assert page.sections["table1"]
    assert cell(page, "table3", "eps", 0) == pytest.approx(0.05)
    assert cell(page, "table3", "nmi", 1, "data-post") == pytest.approx(0.21)
    assert cell(page, "table3", "image_queries", 1) == 5000
    assert json.loads((index.parent / "report.json").read_text())["sweep"]["table3"][0]["trial"] == "t_00003"
