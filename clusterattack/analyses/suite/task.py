"""What one analysis task loads (data sets, test subsets, victims, generators, each once) and what it logs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from clusterattack.analyses.suite.request import SweepAnalysisRequest

log = logging.getLogger(__name__)


class _Loader:
    """Data sets, test subsets, victims and generators of one task, each loaded once."""

    def __init__(self, request: SweepAnalysisRequest) -> None:
        self.request = request
        self._data: dict[str, Any] = {}
        self._victims: dict[tuple[str, str], Any] = {}
        self._generators: dict[str, tuple[Any, str]] = {}

    def dataset(self, name: str) -> Any:
        if name not in self._data:
            from clusterattack.data import read_parquet_dataset

            self._data[name] = read_parquet_dataset(dict(self.request.data_uris)[name])
        return self._data[name]

    def test_sample(self, name: str) -> Any:
        """The sweep's test subset (uint8 images, labels, class names)."""
        return self.dataset(name).subset("test", limit=self.request.eval_limit, seed=self.request.seed)

    def test(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test_sample(name).as_float()

    def train(self, name: str, limit: int | None) -> torch.Tensor:
        return self.dataset(name).subset("train", limit=limit, seed=self.request.seed).as_float()[0]

    def split_size(self, name: str, split: str) -> int:
        return int((self.dataset(name).split == split).sum())

    def victim(self, row: Mapping[str, Any]) -> Any:
        key = (str(row["victim"]), str(row["victim_version"]))
        if key not in self._victims:
            from clusterattack.victims.io import load_victim

            model = load_victim(f"models:/{key[0]}/{key[1]}", device="cpu")
            if isinstance(model, torch.nn.Module):
                model.requires_grad_(False)  # gradients may flow to images (white-box), never into weights
            self._victims[key] = model
        return self._victims[key]

    def generator(self, row: Mapping[str, Any]) -> tuple[Any, str]:
        """(LoadedGenerator, run id of the seed run that registered it) of the row."""
        ref = str(row["generator"])
        if ref not in self._generators:
            from clusterattack.analyses.common import resolve_generator
            from clusterattack.tracking.analyses import registered_generator_info

            name, _, version = ref.partition("/")
            info = registered_generator_info(name, version or None)
            try:
                loaded = resolve_generator(ref)
            except Exception as err:  # torch.load raises several types; each means the same to the reader
                raise ValueError(
                    f"cannot load generator {ref} (file generator/generator.pt of run {info['run_id']}): "
                    f"{type(err).__name__}: {str(err)[:300]}"
                ) from err
            self._generators[ref] = (loaded, info["run_id"])
        return self._generators[ref]


@dataclass
class _Outcome:
    """What one analysis logs: its items (payloads), failed items, figures, tables, files, metrics."""

    items: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, payload: Mapping[str, Any], provenance: Mapping[str, Any], result: Any = None) -> None:
        """One item; ``result`` (an ``AnalysisResult``) adds its figures, tables and metrics under ``key``."""
        self.items.append({"key": key, "provenance": dict(provenance), "payload": dict(payload)})
        if result is None:
            return
        for name, fig in result.figures.items():
            self.figures[f"{key}__{name}"] = fig
        for name, rows in result.tables.items():
            self.tables.setdefault(name, []).extend({"item": key, **r} for r in rows)
        self.metrics.update({f"{key}.{k}": v for k, v in result.metrics.items()})

    def merge(self, other: _Outcome) -> None:
        """Add ``other``'s items, failures, figures, tables, files and metrics to these (one task's share)."""
        self.items.extend(other.items)
        self.failed.extend(other.failed)
        self.figures.update(other.figures)
        for name, rows in other.tables.items():
            self.tables.setdefault(name, []).extend(rows)
        self.files.update(other.files)
        self.metrics.update(other.metrics)

    def attempt(self, key: str, fn: Callable[[], None]) -> None:
        """Run one item; an error is recorded against it and the next item goes on."""
        try:
            fn()
        except Exception as err:  # one bad row (a generator that will not load) must not sink the rest
            log.warning("analysis item %s failed: %r", key, err)
            self.failed.append({"key": key, "error": f"{type(err).__name__}: {err}"})
