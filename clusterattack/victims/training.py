"""Shared training machinery: device and seeds, data on device, staged epochs with checkpoints.

Every recipe in this package is a list of ``Stage`` objects (pretext, clustering,
self-labelling, ...) run by ``run_stages``, which evaluates NMI/ARI/ACC on the test split
after each epoch, reports it through a callback, and writes a checkpoint that
``resume=True`` continues from (stage, epoch, optimiser, RNG and stage state included).
Expensive results that several victims share (the contrastive pretext) are cached on disk
by a hash of everything that determines them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import nn
from tqdm.auto import tqdm

from clusterattack.metrics import clustering_scores
from clusterattack.precision import autocast, check_precision

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else CPU. An explicit CUDA request must be satisfiable."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} requested but CUDA is not available here; use 'cpu' or 'auto'"
        )
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is repeatable on one machine."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainData:
    """Training images (uint8, never labelled for training) and the labelled test split for scoring.

    Images stay uint8 until a batch is drawn so 96x96 RGB sets fit in memory; ``batch``
    returns float views in [0, 1] on the training device.
    """

    name: str
    train_images: torch.Tensor
    test_images: torch.Tensor
    test_labels: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        for key in ("train_images", "test_images"):
            x = getattr(self, key)
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(
                    f"{key} must be uint8 N x C x H x W, got {x.dtype} {tuple(x.shape)}"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"train images {tuple(self.train_images.shape[1:])} and test images "
                f"{tuple(self.test_images.shape[1:])} differ in shape"
            )
        if len(self.test_labels) != len(self.test_images):
            raise ValueError(
                f"{len(self.test_images)} test images but {len(self.test_labels)} labels"
            )

    @classmethod
    def from_dataset(
        cls, dataset, train_limit: int | None = None, test_limit: int | None = None, seed: int = 0
    ) -> TrainData:
        """Train/test splits of an ``ImageDataset``, optionally a seeded subset of each."""
        train = dataset.subset("train", train_limit, seed)
        test = dataset.subset("test", test_limit, seed)
        if len(train) == 0 or len(test) == 0:
            raise ValueError(
                f"{dataset.name}: need both splits, got {len(train)} train and {len(test)} test images"
            )
        return cls(
            dataset.name,
            torch.from_numpy(np.ascontiguousarray(train.images)),
            torch.from_numpy(np.ascontiguousarray(test.images)),
            np.asarray(test.labels, dtype=np.int64),
            dataset.num_classes,
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    def to(self, device: torch.device) -> TrainData:
        return dataclasses.replace(
            self, train_images=self.train_images.to(device), test_images=self.test_images.to(device)
        )

    def batch(self, index: torch.Tensor, device: torch.device, test: bool = False) -> torch.Tensor:
        src = self.test_images if test else self.train_images
        return src[index.to(src.device)].to(device, non_blocking=True).float().div_(255.0)


#: Where shared results (contrastive pretexts, SCAN for RUC, the attacker's backbones) are
#: cached unless a job says otherwise.
DEFAULT_CACHE_DIR = "runs/cache"


@dataclass
class TrainContext:
    """Where and how a recipe runs: device, seed, threads, checkpoints, cache, progress, callbacks.

    ``on_epoch(record)`` receives one dict per finished epoch (stage, epoch, losses,
    nmi/ari/acc on the test split, wall seconds); the MLflow job logs it.
    """

    device: torch.device = field(default_factory=resolve_device)
    seed: int = 0
    num_threads: int | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    cache_dir: Path | None = None
    progress: bool = True
    eval_batch_size: int = 1000
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    precision: str = "fp32"  # "bf16": training steps under bf16 autocast (evaluation stays fp32)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        check_precision(self.precision)

    def apply_threads(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)

    def child(self, checkpoint_dir: Path | None, on_epoch=None) -> TrainContext:
        """The same context writing checkpoints elsewhere (a cached sub-recipe such as the pretext)."""
        return dataclasses.replace(
            self, checkpoint_dir=checkpoint_dir, resume=True, on_epoch=on_epoch
        )


def batches(
    n: int, batch_size: int, desc: str, ctx: TrainContext, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """Random index batches covering ``range(n)`` once, with a progress bar.

    The last short batch is dropped (when there is more than one batch) because
    contrastive and batch-statistics losses misbehave on tiny batches.
    """
    perm = torch.randperm(n)
    stops = list(range(batch_size, n + 1, batch_size)) if drop_last and n >= batch_size else []
    if not stops:
        stops = list(range(batch_size, n, batch_size)) + [n]
    start = 0
    bar = tqdm(stops, desc=desc, leave=False, disable=not ctx.progress, mininterval=10.0)
    for stop in bar:
        yield perm[start:stop]
        start = stop
    bar.close()


@torch.no_grad()
def predict_batches(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 1000,
) -> torch.Tensor:
    """``fn`` applied to uint8 (or float) images in batches; outputs concatenated on the CPU."""
    outs = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        outs.append(fn(x).float().cpu())
    return torch.cat(outs)


def train_features(model: nn.Module, data: TrainData, ctx: TrainContext) -> torch.Tensor:
    """Backbone features of every training image in eval mode (N x D, on the CPU)."""
    was_training = model.training
    model.eval()
    feats = predict_batches(model.features, data.train_images, ctx.device, ctx.eval_batch_size)
    model.train(was_training)
    return feats


def evaluate_clustering(model: nn.Module, data: TrainData, ctx: TrainContext) -> dict[str, float]:
    """NMI/ARI/ACC of the model's argmax clusters on the test split, plus how many clusters are used."""
    was_training = model.training
    model.eval()
    proba = predict_batches(
        lambda x: torch.softmax(model(x), 1), data.test_images, ctx.device, ctx.eval_batch_size
    )
    model.train(was_training)
    pred = proba.argmax(1).numpy()
    scores = clustering_scores(data.test_labels, pred)
    scores["clusters_used"] = float(np.unique(pred).size)
    return scores


class Stage:
    """One phase of a recipe (e.g. SCAN's clustering step). Subclasses implement the hooks.

    ``start`` builds the optimiser and anything mined from the model (neighbours,
    pseudo-labels); given ``state`` from a checkpoint it restores them instead of
    recomputing. ``run_epoch`` trains one epoch and returns mean losses.
    """

    name = "stage"
    # Evaluate on the test split every this many epochs (and after the last one).
    eval_every = 1

    def __init__(self, epochs: int) -> None:
        if epochs < 0:
            raise ValueError(f"{self.name}: epochs must be >= 0, got {epochs}")
        self.epochs = int(epochs)
        self.optimizer: torch.optim.Optimizer | None = None

    def start(
        self, model: nn.Module, data: TrainData, ctx: TrainContext, state: dict | None
    ) -> None:
        raise NotImplementedError

    def run_epoch(
        self, model: nn.Module, data: TrainData, ctx: TrainContext, epoch: int
    ) -> dict[str, float]:
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Tensors mined at ``start`` that a resumed run must reuse (neighbours, labels)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` returned; called by ``start`` on resume."""

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "extra": self.extra_state(),
        }

    def restore(self, state: dict | None) -> bool:
        """Load optimiser and extra state from a checkpoint; False when there is none."""
        if not state:
            return False
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.load_extra_state(state.get("extra", {}))
        return True


class MeanMeter:
    """Running means of named scalars over one epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, **values: float | torch.Tensor) -> None:
        self.count += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file so a crash never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_stages(
    model: nn.Module,
    stages: list[Stage],
    data: TrainData,
    ctx: TrainContext,
    fingerprint: dict,
    evaluate: Callable[
        [nn.Module, TrainData, TrainContext], dict[str, float]
    ] = evaluate_clustering,
    tag: str = "",
) -> list[dict[str, Any]]:
    """Run ``stages`` in order, evaluating and checkpointing after every epoch; return the history.

    ``fingerprint`` (model name, config, recipe, seed) is stored in the checkpoint; resuming
    from a checkpoint written under another fingerprint is refused rather than silently
    mixing two runs.
    """
    ctx.apply_threads()
    model.to(ctx.device)
    ckpt_path = ctx.checkpoint_dir / CHECKPOINT_NAME if ctx.checkpoint_dir is not None else None
    first_stage, first_epoch, saved_stage_state, history = 0, 0, None, []
    if ctx.resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=ctx.device, weights_only=False)
        if ckpt["fingerprint"] != fingerprint:
            raise ValueError(
                f"checkpoint {ckpt_path} was written by another run ({ckpt['fingerprint']}); "
                f"expected {fingerprint}: use another --checkpoint-dir or drop --resume"
            )
        model.load_state_dict(ckpt["model"])
        first_stage, first_epoch = ckpt["stage_index"], ckpt["epoch"]
        saved_stage_state, history = ckpt["stage_state"], ckpt["history"]
        _set_rng_state(ckpt["rng"])
        log.info(
            "%s: resumed from %s at stage %d epoch %d", tag, ckpt_path, first_stage, first_epoch
        )
    else:
        # Seed here, not only at start-up: whether shared work came from the cache (and so
        # drew no random numbers) must not change what this run does.
        seed_everything(ctx.seed)
    for si, stage in enumerate(stages):
        if si < first_stage:
            continue
        resuming = si == first_stage and saved_stage_state is not None
        model.train()
        stage.start(model, data, ctx, saved_stage_state if resuming else None)
        for epoch in range(first_epoch if si == first_stage else 0, stage.epochs):
            t0 = time.perf_counter()
            model.train()
            with autocast(ctx.device, ctx.precision):
                losses = stage.run_epoch(model, data, ctx, epoch)
            train_s = time.perf_counter() - t0
            last = epoch + 1 == stage.epochs
            scores = (
                evaluate(model, data, ctx) if last or (epoch + 1) % stage.eval_every == 0 else {}
            )
            record = {
                "stage": stage.name,
                "stage_epoch": epoch + 1,
                "epoch": len(history) + 1,
                **losses,
                **scores,
                "epoch_s": train_s,
            }
            history.append(record)
            log.info(
                "%s %s epoch %d/%d: %s",
                tag,
                stage.name,
                epoch + 1,
                stage.epochs,
                ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)),
            )
            if ckpt_path is not None:
                done = last
                atomic_save(
                    {
                        "fingerprint": fingerprint,
                        "model": model.state_dict(),
                        "stage_index": si + 1 if done else si,
                        "epoch": 0 if done else epoch + 1,
                        "stage_state": None if done else stage.state_dict(),
                        "history": history,
                        "rng": _rng_state(),
                    },
                    ckpt_path,
                )
            # After the checkpoint, so a callback that fails (or stops the run) loses nothing.
            if ctx.on_epoch is not None:
                ctx.on_epoch(record)
    model.eval()
    return history


def fingerprint_of(**parts: Any) -> dict:
    """A JSON-able description of a run (dataclasses expanded) for checkpoints and cache keys."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, torch.device):
            return str(v)
        return v

    return conv(parts)


def cache_key(fingerprint: dict) -> str:
    """A short stable hash of a fingerprint, used in cache file names."""
    blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class CacheBusy(RuntimeError):
    """``cached(..., wait=False)``: another process is building this entry right now."""


def cached(
    ctx: TrainContext, kind: str, fingerprint: dict, build: Callable[[TrainContext], dict], *, wait: bool = True
) -> tuple[dict, bool]:
    """``build(child_ctx)`` once per fingerprint, its result stored under ``ctx.cache_dir``.

    Returns (result, was_cached). Without a cache dir the result is built every time. The
    child context checkpoints into a folder beside the cache file, so an interrupted build
    resumes too. With ``wait=False`` an entry another process is building raises
    :class:`CacheBusy` instead of waiting for it (the caller may build another entry first).
    """
    if ctx.cache_dir is None:
        return build(ctx.child(None)), False
    key = cache_key(fingerprint)
    path = ctx.cache_dir / f"{kind}-{key}.pt"
    hit = _read_cache(kind, path, fingerprint)
    if hit is not None:
        return hit, True
    # Two processes that miss the same entry (two attacks started side by side) would both
    # build it and write into the same checkpoint folder: the second waits for the first and
    # then reads its result. The lock is an flock, released if its holder dies.
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(ctx.cache_dir / f"{kind}-{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise CacheBusy(f"another process is building {path.name}") from None
        log.info("%s: another process is building %s; waiting for it", kind, path.name)
        lock.acquire()
    try:
        hit = _read_cache(kind, path, fingerprint)
        if hit is not None:
            return hit, True
        result = build(ctx.child(ctx.cache_dir / f"{kind}-{key}.ckpt"))
        atomic_save({"fingerprint": fingerprint, "result": result}, path)
        return result, False
    finally:
        lock.release()


def _read_cache(kind: str, path: Path, fingerprint: dict) -> dict | None:
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob.get("fingerprint") == fingerprint:
        log.info("%s: using cached result %s", kind, path)
        return blob["result"]
    log.warning("%s: cache file %s has another fingerprint; rebuilding", kind, path)
    return None


def store_cached(ctx: TrainContext, kind: str, fingerprint: dict, result: dict) -> Path | None:
    """Write ``result`` where ``cached`` would look for it (so a later recipe can reuse it)."""
    if ctx.cache_dir is None:
        return None
    path = ctx.cache_dir / f"{kind}-{cache_key(fingerprint)}.pt"
    atomic_save({"fingerprint": fingerprint, "result": result}, path)
    return path


def has_checkpoint(ctx: TrainContext) -> bool:
    """True when ``run_stages`` would resume from a checkpoint (so set-up work can be skipped)."""
    return bool(
        ctx.resume
        and ctx.checkpoint_dir is not None
        and (ctx.checkpoint_dir / CHECKPOINT_NAME).exists()
    )


@dataclass(frozen=True)
class TrainOutcome:
    """What a recipe returns: the per-epoch history and facts about the run (pretext time, ...)."""

    history: list
    info: dict = field(default_factory=dict)
