"""What a reader of README.md and docs/ must never meet: run ids, dated run histories, dead links."""

from __future__ import annotations

import re

import pytest

from clusterattack.reports.records import HEADLINE_BEGIN, HEADLINE_END
from tests.docs.doc_blocks import ROOT, doc_pages

PAGES = doc_pages()
README = ROOT / "README.md"
# An MLflow run id as the old README cited them: 8 hex digits, letters and digits mixed.
_RUN_ID = re.compile(r"(?<![0-9A-Za-z_.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{8}(?![0-9A-Za-z_-])")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _ids(pages):
    return [str(p.relative_to(ROOT)) for p in pages]


def test_readme_is_a_short_guide_that_opens_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; keep it a guide (at most 300)"
    head = "\n".join(lines[:20])
    assert "make demo" in head and "make test" in head


def test_the_readme_holds_no_dated_run_history():
    text = README.read_text(encoding="utf-8")
    outside = text[: text.index(HEADLINE_BEGIN)] + text[text.index(HEADLINE_END) :]
    dates = re.findall(r"\b20\d\d-\d\d-\d\d\b", outside)
    assert not dates, f"dated runs belong in docs/results or docs/experiments, found {dates}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_no_mlflow_run_ids_in_prose(page):
    found = sorted(set(_RUN_ID.findall(page.read_text(encoding="utf-8"))))
    assert not found, f"{page.relative_to(ROOT)} cites MLflow run ids {found}: keep them in record files (run_id)"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_no_link_to_the_design_folder(page):
    assert "shared/design" not in page.read_text(encoding="utf-8"), (
        f"{page.relative_to(ROOT)} points at shared/design/, which users of the repository do not have"
    )


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page):
    dead = []
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            dead.append(target)
    assert not dead, f"{page.relative_to(ROOT)} links to missing files: {dead}"
