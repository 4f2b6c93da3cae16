"""Results as data: records of measured tables, their schema, and the pages generated from them.

A record is one JSON file under ``docs/results/`` holding one table: the rows a run (or a
set of runs) measured, and the provenance the evaluation protocol asks of every reported
figure (command, code commit and dirty flag, victim and version, data set and split sizes,
gradient source, recipe, selection objective, eps and norm, seeds, image-queries, calls,
calls of 256, wall time, machine, date). ``docs/results.md`` and the README's headline
table are generated from the records by :func:`regenerate` (``make results``, that is
``python jobs/results.py``; ``--check`` says whether they are stale).

Jobs export a table with :func:`write_record`: a list of row dicts, each with a ``metrics``
dict, plus a provenance dict of the fields every row shares (a row may override any of
them). Records whose provenance is incomplete (figures typed into the README before runs
were exported) carry ``"provenance": "legacy"`` and a ``source``; they are validated less
strictly, rendered apart and marked, and never share a table with full records.

Modules, by role: ``schema`` (the fields, :class:`Record`, :func:`validate_record`),
``files`` (reading and writing records under ``docs/results/``), ``pages`` (the markdown
of the results page and the README's headline block, and :func:`regenerate`).
"""

from clusterattack.reports.records.files import (
    REPO_ROOT,
    RESULTS_DIR,
    code_provenance,
    load_record,
    load_records,
    machine_description,
    mean_std,
    write_record,
)
from clusterattack.reports.records.pages import (
    HEADLINE_BEGIN,
    HEADLINE_END,
    README,
    RESULTS_PAGE,
    format_value,
    regenerate,
    render_headline,
    render_results_page,
    render_table,
    replace_block,
)
from clusterattack.reports.records.schema import (
    KINDS,
    LEGACY_REQUIRED,
    NORMS,
    PROVENANCE_KINDS,
    REQUIRED_FIELDS,
    SCHEMA_VERSION,
    Record,
    RecordError,
    is_record_id,
    validate_record,
)

__all__ = [
    "HEADLINE_BEGIN",
    "HEADLINE_END",
    "KINDS",
    "LEGACY_REQUIRED",
    "NORMS",
    "PROVENANCE_KINDS",
    "README",
    "REPO_ROOT",
    "REQUIRED_FIELDS",
    "RESULTS_DIR",
    "RESULTS_PAGE",
    "SCHEMA_VERSION",
    "Record",
    "RecordError",
    "code_provenance",
    "machine_description",
    "format_value",
    "is_record_id",
    "load_record",
    "load_records",
    "mean_std",
    "regenerate",
    "render_headline",
    "render_results_page",
    "render_table",
    "replace_block",
    "validate_record",
    "write_record",
]
