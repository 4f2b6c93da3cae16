"""docs/results.md and the README's headline table are what the records in docs/results/ generate."""

from __future__ import annotations

import json
import shutil

from clusterattack.reports.records import (
    HEADLINE_BEGIN,
    HEADLINE_END,
    README,
    RESULTS_DIR,
    RESULTS_PAGE,
    load_records,
    regenerate,
)


def test_generated_pages_are_up_to_date():
    stale = regenerate(RESULTS_DIR, RESULTS_PAGE, README, check=True)
    assert not stale, (
        f"stale relative to docs/results/*.json: {[str(p) for p in stale]}; run `make results`"
    )


def test_every_record_is_on_the_page_and_headlines_in_the_readme():
    records = load_records(RESULTS_DIR)
    page = RESULTS_PAGE.read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    block = readme[readme.index(HEADLINE_BEGIN) : readme.index(HEADLINE_END)]
    for record in records:
        assert f'<a id="{record.id}"></a>' in page, record.id
        assert (f"docs/results.md#{record.id})" in block) == record.headline, record.id  # ")": ids prefix others
    assert any(r.headline for r in records), "the README's headline block shows no record"


def test_a_changed_record_makes_both_pages_stale(tmp_path):
    """The check fails when one figure of a headline record changes and nobody regenerates."""
    results = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, results)
    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    shutil.copy(RESULTS_PAGE, page)
    shutil.copy(README, readme)
    assert regenerate(results, page, readme, check=True) == []

    headline = next(r for r in load_records(results) if r.headline)
    path = results / f"{headline.id}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    metrics = data["rows"][0]["metrics"]
    # One seed's figure, or a mean over seeds (then its spread and count stay as they were).
    seeds = metrics["nmi_post"]["n"] if isinstance(metrics["nmi_post"], dict) else 1
    metrics["nmi_post"] = {**metrics["nmi_post"], "mean": 0.5} if seeds > 1 else 0.5
    path.write_text(json.dumps(data), encoding="utf-8")

    assert set(regenerate(results, page, readme, check=True)) == {page, readme}
    assert set(regenerate(results, page, readme)) == {page, readme}
    assert regenerate(results, page, readme, check=True) == []
    assert ("| 0.500 ±" if seeds > 1 else "| 0.500 |") in readme.read_text(encoding="utf-8")
