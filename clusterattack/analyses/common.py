"""Shared pieces of the analyses: resolving victims and generators, cheap attack settings, Ray start-up."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.generator import Generator
from clusterattack.attacks.io import load_generator
from clusterattack.ray_session import init_ray

__all__ = [
    "CHEAP_ATTACK",
    "LoadedGenerator",
    "TaskRunner",
    "as_pairs",
    "attack_pool_size",
    "init_ray",
    "load_victim_named",
    "resolve_generator",
    "test_split",
    "train_split",
    "victim_source",
]

log = logging.getLogger(__name__)

#: Small generator-training settings for analyses that train many generators on a CPU
#: (1-2 CPU-minutes each on Fashion-MNIST): 2,000 training images, 6 epochs, surrogate from
#: 4,000 queries, alpha_a 30 and alpha_c 0.1 (near the best of the demo sweep). Override
#: any field with ``AttackConfig.override``.
CHEAP_ATTACK = AttackConfig(
    eps=0.15,
    epochs=6,
    train_limit=2000,
    alpha_a=30.0,
    alpha_c=0.1,
    gradient_source="surrogate",
).override(
    **{
        "surrogate.distill_queries": 4000,
        "surrogate.distill_epochs": 4,
        "surrogate.refresh_rounds": 1,
        "surrogate.refresh_queries": 1000,
        "surrogate.refresh_epochs": 2,
        "surrogate.online": False,
    }
)

_REGISTERED = re.compile(r"^(generator-[A-Za-z0-9_.-]+?)(?:/(\d+|latest))?$")


def as_pairs(mapping: Mapping[str, str] | tuple[tuple[str, str], ...] | None) -> tuple[tuple[str, str], ...]:
    """A mapping as sorted (key, value) pairs: the hashable form frozen configs keep."""
    if mapping is None:
        return ()
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple(sorted((str(k), str(v)) for k, v in items))


def victim_source(name: str, dataset: str, files: Mapping[str, str] | None = None) -> str:
    """Where victim ``name`` is loaded from: a file given for it, else ``victim-<name>-<dataset>`` (registry)."""
    if files and name in files:
        return str(files[name])
    return f"victim-{name}-{dataset}"


def load_victim_named(name: str, dataset: str, files: Mapping[str, str] | None = None, device: str = "cpu"):
    """The trained victim ``name`` on ``dataset`` in eval mode, weights frozen (no gradient is ever needed).

    ``files`` may map a name to any victim spec (docs/own-model.md); a decision-only one is
    seen as the one-hot memberships of its cluster ids (scores need only the ids).
    """
    from clusterattack.victims.io import load_victim
    from clusterattack.victims.sources import OneHotMemberships, is_decision_only, parse_victim_spec

    source = victim_source(name, dataset, files)
    # A model of our own says its input shape; another may need the data set's (and is checked on it).
    own = parse_victim_spec(source).kind in ("registry", "file")
    model = load_victim(source, device=device) if own else load_victim(source, device=device, dataset=dataset)
    if isinstance(model, torch.nn.Module):
        model.requires_grad_(False)
    return OneHotMemberships(model) if is_decision_only(model) else model


@dataclass(frozen=True)
class LoadedGenerator:
    """A trained generator, the config it was trained with, where it came from and what it cost."""

    generator: Generator
    config: AttackConfig
    reference: str
    image_queries: int | None = None
    extra: Mapping[str, Any] | None = None


def resolve_generator(reference: str, device: str = "cpu") -> LoadedGenerator:
    """Load a generator from a file (``attacks.io.save_generator``) or a registry name.

    Registry names are ``generator-<model>-<dataset>`` with an optional ``/<version>``
    (newest when left out); the file is the registering run's ``generator/generator.pt``
    and its image-queries come from that run's metrics.
    """
    path = Path(reference)
    if path.is_file():
        generator, config, extra = load_generator(path, device)
        queries = extra.get("image_queries") if isinstance(extra, dict) else None
        return LoadedGenerator(generator, config, str(path), None if queries is None else int(queries), extra)
    match = _REGISTERED.match(reference)
    if match is None:
        raise ValueError(
            f"cannot resolve generator {reference!r}: expected an existing generator file or a "
            "registry name 'generator-<model>-<dataset>[/<version>]'"
        )
    from clusterattack.tracking.analyses import (
        download_registered_generator,
        registered_generator_info,
    )

    name, version = match.group(1), match.group(2)
    info = registered_generator_info(name, None if version in (None, "latest") else version)
    local = download_registered_generator(name, info["version"])
    generator, config, extra = load_generator(local, device)
    queries = info["metrics"].get("image_queries")
    return LoadedGenerator(
        generator, config, f"{name}/{info['version']}", None if queries is None else int(queries), extra
    )


def attack_pool_size(config: AttackConfig) -> int | None:
    """Training images an attack needs: its ``train_limit``, or more when a surrogate distils from more."""
    if config.train_limit is None:
        return None
    if config.gradient_source == "surrogate":
        return max(config.train_limit, config.surrogate.distill_queries)
    return config.train_limit


def test_split(dataset: str, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float test images in [0, 1] and their labels: a seeded subset of ``limit`` (all when None)."""
    from clusterattack.data import load_dataset

    return load_dataset(dataset).subset("test", limit=limit, seed=seed).as_float()


def train_split(dataset: str, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float training images (labels returned but never used by attacks or detectors' fitting)."""
    from clusterattack.data import load_dataset

    return load_dataset(dataset).subset("train", limit=limit, seed=seed).as_float()


def _with_threads(threads: int, fn: Callable, *args: Any) -> Any:
    torch.set_num_threads(threads)
    return fn(*args)


class TaskRunner:
    """Runs the same functions as Ray tasks or in this process (``use_ray`` False), in submission order.

    Each task asks Ray for ``num_cpus`` CPUs and ``num_gpus`` GPUs and runs with ``threads``
    torch threads; ``max_retries`` (None: Ray's default) is how often a task whose worker
    died is run again. ``close`` stops the Ray this runner started, if it did.
    """

    def __init__(
        self,
        use_ray: bool,
        threads: int,
        address: str | None,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_retries: int | None = None,
    ) -> None:
        self.use_ray = use_ray
        self.threads = threads
        self.started_ray = False
        if use_ray:
            import ray

            self.started_ray = init_ray(address)
            options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
            if max_retries is not None:
                options["max_retries"] = max_retries
            self._remote = ray.remote(**options)(_with_threads)

    def put(self, value: Any) -> Any:
        if not self.use_ray:
            return value
        import ray

        return ray.put(value)

    def submit(self, fn: Callable, *args: Any) -> Any:
        if self.use_ray:
            return self._remote.remote(self.threads, fn, *args)
        return ("local", fn, args)

    def gather(self, handles: Sequence[Any], desc: str, progress: bool) -> list[Any]:
        from tqdm.auto import tqdm

        if not self.use_ray:
            out = []
            for _, fn, args in tqdm(handles, desc=desc, disable=not progress):
                out.append(_with_threads(self.threads, fn, *args))
            return out
        import ray

        pending = list(handles)
        with tqdm(total=len(pending), desc=desc, disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
                log.info("%s: %d/%d tasks done", desc, len(handles) - len(pending), len(handles))
        return ray.get(list(handles))

    def as_completed(self, handles: Sequence[Any]) -> Iterator[tuple[int, Any, Exception | None]]:
        """``(index, result, None)`` or ``(index, None, error)`` of each task as it ends (locally: in order).

        One task's error does not stop the others; ``error`` is what the function raised
        (Ray's wrapper unwrapped), or Ray's error when the worker itself died.
        """
        if not self.use_ray:
            for i, (_, fn, args) in enumerate(handles):
                try:
                    yield i, _with_threads(self.threads, fn, *args), None
                except Exception as err:  # reported to the caller with the task it belongs to
                    yield i, None, err
            return
        import ray

        index = {ref: i for i, ref in enumerate(handles)}
        pending = list(handles)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except Exception as err:  # RayTaskError carries the function's own error as ``cause``
                cause = getattr(err, "cause", None)
                yield index[done[0]], None, cause if isinstance(cause, Exception) else err
            else:
                yield index[done[0]], result, None

    def close(self) -> None:
        """Stop Ray if this runner started it (a Ray found running is left as it is)."""
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False
