"""Stateful query detection (Blacklight-style) at the served victim against every attack, in one run.

A victim served on Ray Serve with query detection (``clusterattack.serving.detector``) in
three deployments of the same model, ``flag``, ``block`` and ``off``, and the album service
in ``flag`` and ``block``; every attack and honest stream gets fresh keys. It measures:

1. calibration (no serving): for a grid of detector parameters, the share of attack-like
   near copies (NES, SPSA noise, Square patches, exact and shifted repeats, brightness)
   that match their original and of distinct images that match anything, on 8x8 digits and
   28x28 MNIST: what the defaults of ``DetectionConfig`` rest on;
2. per attack (NES, SPSA, Square, the generator in surrogate and estimate modes, the
   album-API surrogate attack): against ``flag``, queries until the key is flagged, share
   of its queries that matched, the NMI drop it reaches; against ``block``, whether it
   still completes and what it then reaches (a blocked attack ends with the clean images:
   drop 0);
3. honest traffic against ``flag``: distinct clean images, the album API's normal use
   (albums from a photo library, a tenth of each album re-used photos), and re-uploads of
   lightly cropped and re-lit photos: matched share and whether the key is flagged;
4. throughput with detection on (``flag``) against ``off``, the same workload interleaved;
5. evasion (``flag``), each as a victim wrapper of ``clusterattack.attacks.evasion`` or an
   attack's own parameter: answers recalled instead of re-asked, queries spread over 8 keys
   (unlinked, and linked to one owner), fresh noise on every query, coarser NES steps, and
   for the album attack clean albums uploaded by someone else: flagged or not, matched
   share, NMI drop and queries against the plain attack.

    python benchmarks/query_detection.py                     # digits 8x8: a few minutes on 2 cores
    python benchmarks/query_detection.py --dataset mnist5k --n-test 100 --budget 400 --epochs 6
    python benchmarks/query_detection.py --only calibrate    # the parameter grid alone, seconds

Tables (markdown) are printed and written with a figure (PNG) and the JSON rows to ``--out``;
records go to ``docs/results/`` (``--no-record`` skips them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

log = logging.getLogger("query_detection")

ATTACKS = ("nes", "spsa", "square", "gen-surrogate", "gen-estimate", "album")
SECTIONS = ("calibrate", "attacks", "honest", "throughput", "evasion")


# ---------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits (8x8, default), mnist5k, fashion_mnist, ...")
    p.add_argument("--n-test", type=int, default=30, help="test images the per-image baselines attack and every attack is scored on")
    p.add_argument("--budget", type=int, default=200, help="per-image image-queries of NES, SPSA and Square")
    p.add_argument("--train-limit", type=int, default=800, help="attacker pool of the generator")
    p.add_argument("--epochs", type=int, default=5, help="generator epochs")
    p.add_argument("--eps", type=float, default=0.2, help="L-inf eps of every attack (0.1 moves few 8x8 digits off their k-means cluster)")
    p.add_argument("--draws", type=int, default=2, help="album attack: draws (each a clean and a perturbed album)")
    p.add_argument("--per-class", type=int, default=4, help="album attack: images per class in an album")
    p.add_argument("--honest", type=int, default=600, help="queries of each honest stream")
    p.add_argument("--throughput-images", type=int, default=1024, help="images per throughput round")
    p.add_argument("--rounds", type=int, default=5, help="throughput rounds per deployment (interleaved)")
    p.add_argument("--spread-keys", type=int, default=8, help="keys of the spread evasion")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--detection", default="", help="detector overrides, e.g. flag_after=50,history=4000")
    p.add_argument("--out", default="runs/bench/query_detection")
    p.add_argument("--record-dir", default=None, help="where records go (default docs/results; the figure to docs/figures)")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def detection_config(overrides: str):
    from clusterattack.serving.detection import DetectionConfig

    changes: dict[str, Any] = {}
    for item in filter(None, overrides.split(",")):
        name, _, value = item.partition("=")
        kind = type(getattr(DetectionConfig(), name.strip()))
        changes[name.strip()] = kind(value)
    return DetectionConfig(**changes)


# ---------------------------------------------------------------------- the victim
class SoftKMeans(nn.Module):
    """k-means centroids as a soft clustering: softmax(-||x - c||^2 / T). Trained in a second."""

    def __init__(self, centroids: torch.Tensor, input_shape: tuple[int, int, int], temperature: float) -> None:
        super().__init__()
        self.num_clusters = int(centroids.shape[0])
        self.input_shape = tuple(input_shape)
        self.register_buffer("centroids", centroids.float())
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x.flatten(1), self.centroids).pow(2) / self.temperature

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)


def fit_soft_kmeans(images: torch.Tensor, k: int, seed: int) -> SoftKMeans:
    from sklearn.cluster import KMeans

    flat = images.flatten(1).numpy()
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(flat)
    d2 = km.transform(flat) ** 2
    d2.sort(axis=1)
    # Temperature: the median gap between the nearest and second centroid is worth 2 nats.
    temperature = float(np.median(d2[:, 1] - d2[:, 0]) / 2.0)
    return SoftKMeans(torch.from_numpy(km.cluster_centers_), tuple(images.shape[1:]), temperature).eval()


def nmi_of(model: nn.Module, images: torch.Tensor, labels: np.ndarray) -> float:
    from clusterattack.metrics import clustering_scores

    with torch.no_grad():
        assigned = model.predict_proba(images).argmax(1).numpy()
    return float(clustering_scores(labels, assigned)["nmi"])


# ---------------------------------------------------------------------- calibration
def _calibration_images(dataset: str, n: int, seed: int) -> np.ndarray:
    from clusterattack.data import load_dataset

    x, _ = load_dataset(dataset).subset("test", limit=n, seed=seed).as_float()
    return x.numpy()


def near_copies(base: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What attacks and honest users re-send of an image, one per kind."""
    height = base.shape[-1]
    side = max(2, height // 4)
    square = base.copy()
    for img in square:
        r, c = rng.integers(0, height - side + 1, 2)
        img[:, r : r + side, c : c + side] = np.clip(img[:, r : r + side, c : c + side] + 0.1 * rng.choice([-1, 1]), 0, 1)
    return {
        "exact": base,
        "nes_0.02": np.clip(base + 0.02 * rng.standard_normal(base.shape), 0, 1),
        "spsa_0.01": np.clip(base + 0.01 * rng.choice([-1, 1], base.shape), 0, 1),
        "square_patch": square,
        "shift_1px": np.roll(base, 1, axis=-1),
        "brightness_1.05": np.clip(base * 1.05, 0, 1),
        "sign_0.1": np.clip(base + 0.1 * rng.choice([-1, 1], base.shape), 0, 1),
    }


def calibrate(seed: int, n_distinct: int = 400, n_copies: int = 60) -> list[dict[str, Any]]:
    """Match rates over a grid of detector parameters on two data sets (no serving)."""
    from clusterattack.serving.detection import DetectionConfig, fingerprints

    default = DetectionConfig()
    grid = [
        {"levels": levels, "window_rows": rows, "match_fraction": fraction, "min_contrast": default.min_contrast}
        for levels in (3, 4, 6) for rows in (1, 2, 3) for fraction in (0.3, 0.4, 0.5)
    ] + [
        {"levels": default.levels, "window_rows": default.window_rows, "match_fraction": default.match_fraction,
         "min_contrast": contrast}
        for contrast in (0.0, 0.05, 0.25)
    ]  # fmt: skip
    rows = []
    for dataset in ("digits", "mnist5k"):
        images = _calibration_images(dataset, n_distinct, seed)
        copies = near_copies(images[:n_copies], np.random.default_rng(seed))
        for params in grid:
            cfg = dataclasses.replace(default, history=4096, **params)
            spec = cfg.spec(salt=seed + 1)
            index = cfg.index()
            prints = fingerprints(images, spec)
            distinct = index.match(prints)
            row = {
                "dataset": dataset, **params, "no_hash": float(((prints != 0).sum(1) == 0).mean()),
                "distinct": float(distinct.matched.mean()),
            }  # fmt: skip
            for name, x in copies.items():
                again = index.match(fingerprints(x.astype(np.float32), spec), add=False)
                row[name] = float(again.matched.mean())
            row["default"] = all(getattr(default, k) == v for k, v in params.items())
            rows.append(row)
    return rows


# ---------------------------------------------------------------------- the served platform
@dataclasses.dataclass
class Platform:
    """The apps, keys and admin handles of one benchmark run."""

    urls: dict[str, str]
    ledger: Any
    admin: Any
    detector: Any
    detection: Any

    def new_key(self, name: str, budget: int = 10**8, owner: str | None = None) -> tuple[str, str]:
        issued = self.admin.create_key(f"{name}-{uuid.uuid4().hex[:4]}"[:64], budget=budget)
        if owner is not None:
            self.detector.set_owner(issued.key_id, owner)
        return issued.api_key, issued.key_id

    def seen(self, key_id: str):
        return self.detector.key_status(key_id)


@contextlib.contextmanager
def serve_platform(victim: nn.Module, detection, threads: int):
    import ray
    from ray import serve

    from clusterattack.api.config import AlbumServiceConfig
    from clusterattack.api.grouping import GroupingSpec
    from clusterattack.api.launch import deploy_album_service
    from clusterattack.api.service import store_actor_name
    from clusterattack.api.store import kill_album_store
    from clusterattack.serving.config import ServeConfig
    from clusterattack.serving.deployment import deploy_victim, start_serve
    from clusterattack.serving.detector import DetectorAdmin, kill_detector
    from clusterattack.serving.ledger_actor import LedgerAdmin, LedgerConfig, kill_ledger

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(2, threads), include_dashboard=False, log_to_driver=False,
                 configure_logging=False, object_store_memory=256 * 1024**2)  # fmt: skip
    folder = tempfile.mkdtemp(prefix="query-detection-")
    ledger = LedgerConfig(db_path=os.path.join(folder, "ledger.sqlite"), actor_name=f"qd-ledger-{uuid.uuid4().hex[:8]}")
    admin = LedgerAdmin(ledger)
    port = start_serve("127.0.0.1", _free_port())
    # Five apps of one replica each must fit the two CPUs Ray is given here.
    limits = {"num_cpus": 0.2, "torch_threads": 1, "max_images_per_request": 1024, "max_request_bytes": 64 * 1024**2}
    scores = ServeConfig(mode="scores", **limits)
    apps = {"off": "qd-off", "flag": "qd-flag", "block": "qd-block"}
    for policy, name in apps.items():
        deploy_victim(victim, name=name, config=scores, ledger=ledger, detection=detection.with_policy(policy))
    album_config = AlbumServiceConfig(serve=ServeConfig(mode="labels", **limits), grouping=GroupingSpec("labels"))
    albums = {"album-flag": "qd-albums-flag", "album-block": "qd-albums-block"}
    for policy, name in albums.items():
        deploy_album_service(victim, name=name, config=album_config, ledger=ledger,
                             detection=detection.with_policy(policy.split("-")[1]))  # fmt: skip
    urls = {p: f"http://127.0.0.1:{port}/{n}" for p, n in {**apps, **albums}.items()}
    try:
        yield Platform(urls, ledger, admin, DetectorAdmin(ledger, detection), detection)
    finally:
        serve.shutdown()
        for name in albums.values():
            kill_album_store(store_actor_name(name), album_config.store_namespace)
        kill_detector(ledger)
        kill_ledger(ledger)
        if started:
            ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- attacks
@dataclasses.dataclass
class Data:
    train_x: torch.Tensor
    test_x: torch.Tensor
    test_y: np.ndarray
    dataset: Any


def generator_config(args: argparse.Namespace, source: str):
    from clusterattack.attacks import AttackConfig

    return AttackConfig(
        gradient_source=source, norm="linf", eps=args.eps, epochs=args.epochs, batch_size=64,
        train_limit=args.train_limit, generator_blocks=1, seed=args.seed,
    ).override(**{
        "surrogate.distill_queries": args.train_limit, "surrogate.distill_epochs": 4,
        "surrogate.refresh_rounds": 1, "surrogate.refresh_queries": args.train_limit // 2,
        "surrogate.width": 8, "surrogate.batch_size": 64, "estimator.samples": 2,
    })  # fmt: skip


def run_attack(name: str, victim: Any, data: Data, args: argparse.Namespace, **changes: Any) -> torch.Tensor:
    """The attack's adversarial test images, through ``victim`` (raises what the victim raises)."""
    if name in ("nes", "spsa", "square"):
        from clusterattack.attacks.baselines import make_baseline

        attack = make_baseline(name, eps=args.eps, max_queries=args.budget, seed=args.seed, **changes)
        return attack.run(victim, data.test_x).adv_images
    from clusterattack.attacks.gan import perturb_images, train_generator

    cfg = generator_config(args, name.removeprefix("gen-"))
    result = train_generator(victim, data.train_x, cfg, progress=False)
    return perturb_images(result.generator, data.test_x, cfg)


def album_offline(data: Data, args: argparse.Namespace):
    """The album attacker's own surrogate (k-means on its pool, no labels) and a generator trained on it."""
    from clusterattack.api.attack import ApiAttackConfig, OfflineAttack
    from clusterattack.attacks.gan import train_generator

    pool = data.train_x[torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(args.seed + 7))]
    surrogate = fit_soft_kmeans(pool[: max(args.train_limit, 200)], data.dataset.num_classes, args.seed + 7)
    cfg = generator_config(args, "whitebox")
    result = train_generator(surrogate, pool[: args.train_limit], cfg, progress=False)
    config = ApiAttackConfig(dataset=args.dataset, attack=cfg, draws=args.draws, per_class=args.per_class, seed=args.seed)
    return config, OfflineAttack(surrogate, {}, result, {}, "k-means on the attacker's pool")


class CleanElsewhere:
    """An AlbumClient whose clean albums go through another (the experimenter's) key."""

    def __init__(self, attacker: Any, experimenter: Any) -> None:
        self.attacker, self.experimenter = attacker, experimenter

    def cluster(self, images: Any, *, name: str | None = None, keep: bool = False) -> np.ndarray:
        client = self.experimenter if name and name.endswith("-clean") else self.attacker
        return client.cluster(images, name=name, keep=keep)

    def counts(self) -> dict[str, int]:
        return self.attacker.counts()


def run_album(platform_: Platform, policy: str, data: Data, args: argparse.Namespace, offline, *,
              clean_elsewhere: bool = False) -> tuple[dict[str, Any], float | None, list[str]]:  # fmt: skip
    from clusterattack.api.attack import attack_service
    from clusterattack.api.client import AlbumClient
    from clusterattack.serving.errors import QueryBlocked

    config, attack = offline
    api_key, key_id = platform_.new_key(f"album-{policy}")
    client: Any = AlbumClient(platform_.urls[f"album-{policy}"], api_key)
    if clean_elsewhere:
        other_key, _ = platform_.new_key("album-experimenter")
        client = CleanElsewhere(client, AlbumClient(platform_.urls[f"album-{policy}"], other_key))
    try:
        result = attack_service(config, attack, client, data.dataset)
        drop = float(result.summary["nmi_drop"])
    except QueryBlocked:
        drop = None
    return {"image_queries": _album_images(client)}, drop, [key_id]


def _album_images(client: Any) -> int:
    inner = getattr(client, "attacker", client)
    return int(inner.image_queries)


def attack_row(name: str, policy: str, platform_: Platform, data: Data, args: argparse.Namespace, nmi_pre: float,
               scorer: nn.Module, offline=None, wrap=None, option: str = "-", keys: int = 1, linked: bool = False,
               **changes: Any) -> dict[str, Any]:  # fmt: skip
    """One attack against the ``policy`` app with fresh keys: detection and NMI drop.

    ``wrap`` turns the list of ``keys`` served victims into the victim the attack holds (an
    evasion wrapper); ``linked`` gives the keys one owner first.
    """
    from clusterattack.attacks.evasion import evasion_counts
    from clusterattack.metrics import relative_drop
    from clusterattack.serving.client import ServedVictim
    from clusterattack.serving.errors import QueryBlocked

    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if name == "album":
        counts, drop, key_ids = run_album(platform_, policy, data, args, offline, clean_elsewhere=option == "clean-elsewhere")
        queries = counts["image_queries"]
        completed = drop is not None
    else:
        owner = f"owner-{uuid.uuid4().hex[:6]}" if linked else None
        issued = [platform_.new_key(f"{name}-{policy}", owner=owner) for _ in range(keys)]
        key_ids = [k for _, k in issued]
        served = [ServedVictim(platform_.urls[policy], k, chunk_size=256) for k, _ in issued]
        victim = wrap(served) if wrap is not None else served[0]
        try:
            adv = run_attack(name, victim, data, args, **changes)
            completed = True
        except QueryBlocked:
            completed, adv = False, None
        queries = int(sum(v.image_queries for v in served))
        extra = evasion_counts(victim)
        for v in served:
            v.close()
        drop = None if adv is None else relative_drop(nmi_pre, nmi_of(scorer, adv, data.test_y))
    seen = [platform_.seen(k) for k in key_ids]
    screened = sum(s.queries for s in seen)
    matched = sum(s.matched for s in seen)
    flagged = [s for s in seen if s.flagged]
    flag_queries = [s.flag_query for s in flagged if s.flag_query is not None and s.flag_key in key_ids]
    row = {
        "attack": name, "option": option, "policy": policy, "completed": completed,
        "image_queries": queries, "screened": screened, "matched": matched,
        "matched_fraction": matched / screened if screened else 0.0,
        "flagged": bool(flagged), "keys": len(key_ids), "keys_flagged": len({s.scope for s in flagged}),
        "queries_to_flag": min(flag_queries) if flag_queries else None,
        "first_match": min((s.first_match_query for s in seen if s.first_match_query), default=None),
        "nmi_drop": 0.0 if drop is None else float(drop), "seconds": round(time.perf_counter() - started, 1),
        **extra,
    }  # fmt: skip
    log.info("%s", row)
    return row


# ---------------------------------------------------------------------- honest traffic
def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A re-uploaded photo: cropped by up to 1/8 of its side, resized back, re-lit by +-5%."""
    x = torch.from_numpy(images)
    out = []
    side = images.shape[-1]
    for img in x:
        cut = int(rng.integers(1, max(2, side // 8) + 1))
        top, left = (int(v) for v in rng.integers(0, cut + 1, 2))
        crop = img[:, top : side - (cut - top), left : side - (cut - left)]
        back = torch.nn.functional.interpolate(crop[None], size=(side, side), mode="bilinear", align_corners=False)[0]
        out.append((back * float(rng.uniform(0.95, 1.05))).clamp(0, 1))
    return torch.stack(out).numpy().astype(np.float32)


def honest_rows(platform_: Platform, data: Data, args: argparse.Namespace) -> list[dict[str, Any]]:
    from clusterattack.api.client import AlbumClient
    from clusterattack.serving.client import ServedVictim

    rng = np.random.default_rng(args.seed + 11)
    # Honest users hold their own photos: every image of the data set, in a random order.
    everything = np.concatenate([data.dataset.subset(split).as_float()[0].numpy() for split in ("test", "train")])
    order = rng.permutation(len(everything))
    rows = []
    n = args.honest

    # Distinct clean images, in requests of 32.
    api_key, key_id = platform_.new_key("honest-distinct")
    with ServedVictim(platform_.urls["flag"], api_key) as victim:
        for start in range(0, min(n, len(order)), 32):
            victim.predict_proba(torch.from_numpy(everything[order[start : min(n, start + 32)]]))
    rows.append(_honest_row("distinct clean images", platform_.seen(key_id)))

    # The album API's normal use: albums of 40 from a library, a tenth of each re-used photos.
    api_key, key_id = platform_.new_key("honest-albums")
    client = AlbumClient(platform_.urls["album-flag"], api_key)
    library, used, sent, album = everything[order], [], 0, 0
    fresh = 0
    while sent < n:
        size = min(40, n - sent)
        reused = min(len(used), size // 10)
        picks = list(rng.choice(used, reused, replace=False)) if reused else []
        picks += list(range(fresh, fresh + size - reused))
        fresh += size - reused
        used += picks[reused:]
        client.cluster(library[np.array(picks)], name=f"album-{album}")
        sent += size
        album += 1
    rows.append(_honest_row("album API normal use (10% photos re-used)", platform_.seen(key_id)))

    # Re-uploads: every photo sent, then again a few uploads later, cropped and re-lit.
    api_key, key_id = platform_.new_key("honest-reuploads")
    photos = everything[order[: n // 2]]
    again = augment(photos, rng)
    stream, pending = [], []
    for i in range(len(photos)):
        stream.append(photos[i])
        pending.append(again[i])
        if len(pending) > int(rng.integers(1, 6)):
            stream.append(pending.pop(0))
    stream += pending
    with ServedVictim(platform_.urls["flag"], api_key) as victim:
        stream_x = np.stack(stream)
        for start in range(0, len(stream_x), 16):
            victim.predict_proba(torch.from_numpy(stream_x[start : start + 16]))
    rows.append(_honest_row("re-uploads, cropped and re-lit (half the stream)", platform_.seen(key_id)))
    return rows


def _honest_row(stream: str, seen) -> dict[str, Any]:
    row = {
        "stream": stream, "queries": seen.queries, "matched": seen.matched,
        "matched_fraction": seen.matched / seen.queries if seen.queries else 0.0,
        "flagged": seen.flagged, "queries_to_flag": seen.flag_query,
    }  # fmt: skip
    log.info("%s", row)
    return row


# ---------------------------------------------------------------------- throughput
def throughput_rows(platform_: Platform, data: Data, args: argparse.Namespace) -> list[dict[str, Any]]:
    from clusterattack.serving.client import ServedVictim

    pool = torch.cat([data.test_x, data.train_x])
    images = pool[torch.arange(args.throughput_images) % len(pool)]
    rates: dict[str, list[float]] = {"off": [], "flag": []}
    for _ in range(args.rounds):
        for policy in ("off", "flag"):
            api_key, _ = platform_.new_key(f"throughput-{policy}")
            with ServedVictim(platform_.urls[policy], api_key, chunk_size=64, max_in_flight=4) as victim:
                started = time.perf_counter()
                victim.predict_proba(images)
                rates[policy].append(len(images) / (time.perf_counter() - started))
    rows = [
        {"policy": p, "images_per_s": statistics.median(r), "min": min(r), "max": max(r), "rounds": [round(v) for v in r]}
        for p, r in rates.items()
    ]
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    for row in rows:
        row["ratio_to_off"] = row["images_per_s"] / rows[0]["images_per_s"]
    log.info("throughput: %s (on/off %.3f)", rows, ratio)
    return rows


# ---------------------------------------------------------------------- evasion
def evasion_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The evasions measured: attack, option, the wrapper of its victims, keys, attack changes."""
    from clusterattack.attacks.evasion import NoisyQueries, RecallRepeats, SpreadKeys

    def one(wrapper, **kw):
        return lambda victims: wrapper(victims[0], **kw)

    noise = one(NoisyQueries, amplitude=0.1, seed=args.seed)
    n = args.spread_keys
    return [
        {"name": "nes", "option": "recall", "wrap": one(RecallRepeats)},
        {"name": "nes", "option": "noise 0.1", "wrap": noise},
        {"name": "nes", "option": "coarse sigma 0.1", "sigma": 0.1},
        {"name": "nes", "option": f"spread {n} keys", "wrap": SpreadKeys, "keys": n},
        {"name": "nes", "option": f"spread {n} keys, linked", "wrap": SpreadKeys, "keys": n, "linked": True},
        {"name": "square", "option": "noise 0.1", "wrap": noise},
        {"name": "gen-surrogate", "option": "recall", "wrap": one(RecallRepeats)},
        {"name": "gen-surrogate", "option": "noise 0.1", "wrap": noise},
        {"name": "gen-estimate", "option": "noise 0.1", "wrap": noise},
        {"name": "album", "option": "clean-elsewhere"},
    ]


# ---------------------------------------------------------------------- output
def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


ATTACK_COLUMNS = ["attack", "policy", "completed", "image_queries", "screened", "matched_fraction", "queries_to_flag",
                  "first_match", "flagged", "nmi_drop", "seconds"]  # fmt: skip
HONEST_COLUMNS = ["stream", "queries", "matched", "matched_fraction", "flagged", "queries_to_flag"]
EVASION_COLUMNS = ["attack", "option", "keys", "keys_flagged", "flagged", "image_queries", "matched_fraction",
                   "queries_to_flag", "nmi_drop", "plain_nmi_drop", "plain_queries", "recalled"]  # fmt: skip
CALIBRATION_COLUMNS = ["dataset", "levels", "window_rows", "match_fraction", "min_contrast", "no_hash", "distinct", "exact", "nes_0.02",
                       "spsa_0.01", "square_patch", "shift_1px", "brightness_1.05", "sign_0.1", "default"]  # fmt: skip


def figure(results: dict[str, Any], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    flag = [r for r in results.get("attacks", []) if r["policy"] == "flag"]
    block = {r["attack"]: r for r in results.get("attacks", []) if r["policy"] == "block"}
    honest = results.get("honest", [])
    names = [r["attack"] for r in flag] + [f"honest: {h['stream'].split(' (')[0].split(',')[0]}" for h in honest]
    fractions = [r["matched_fraction"] for r in flag] + [h["matched_fraction"] for h in honest]
    colors = ["C3" if r["flagged"] else "C0" for r in flag] + ["C3" if h["flagged"] else "0.6" for h in honest]
    bars = ax1.barh(range(len(names)), fractions, color=colors)
    for bar, r in zip(bars, flag + honest, strict=True):
        label = f"flag @ {r['queries_to_flag']}" if r["flagged"] else "not flagged"
        ax1.text(min(bar.get_width() + 0.02, 0.7), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=7)
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("share of the key's queries that matched an earlier one")
    ax1.set_title("detection (policy flag): red = key flagged", fontsize=9)
    attacks = [r["attack"] for r in flag]
    x = np.arange(len(attacks))
    ax2.bar(x - 0.2, [r["nmi_drop"] for r in flag], 0.4, label="no blocking (flag)", color="C0")
    ax2.bar(x + 0.2, [block[a]["nmi_drop"] if a in block else 0 for a in attacks], 0.4, label="block", color="C3")
    for i, a in enumerate(attacks):
        if a in block and not block[a]["completed"]:
            ax2.text(i + 0.2, 0.01, "blocked", rotation=90, ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(x, attacks, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("relative NMI drop reached")
    ax2.set_title("what each attack reaches, without and with blocking", fontsize=9)
    ax2.legend(fontsize=7)
    evasion = results.get("evasion", [])
    labels = [f"{r['attack']}: {r['option']}" for r in evasion]
    y = np.arange(len(evasion))
    ax3.barh(y - 0.2, [r["plain_nmi_drop"] or 0 for r in evasion], 0.4, color="0.7", label="plain attack")
    ax3.barh(y + 0.2, [r["nmi_drop"] for r in evasion], 0.4,
             color=["C3" if r["flagged"] else "C2" for r in evasion], label="with the evasion (red: still flagged)")  # fmt: skip
    for i, r in enumerate(evasion):
        ax3.text(max(r["nmi_drop"], 0) + 0.01, i + 0.2, f"matched {r['matched_fraction']:.0%}", va="center", fontsize=6)
    ax3.set_yticks(y, labels, fontsize=7)
    ax3.invert_yaxis()
    ax3.set_xlabel("relative NMI drop")
    ax3.set_title("evasion: what it costs (policy flag)", fontsize=9)
    ax3.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=130)


def machine() -> str:
    from clusterattack.reports.records import machine_description

    return machine_description()


def provenance(argv: list[str] | None, wall_s: float) -> dict[str, Any]:
    from clusterattack.tracking.store import read_source_tags

    tags = read_source_tags(Path(__file__).resolve().parents[1])
    return {
        "command": "python benchmarks/query_detection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": tags.get("clusterattack.git_commit", "unknown")[:12],
        "dirty": tags.get("clusterattack.git_dirty") == "true",
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "wall_s": round(wall_s, 1),
    }


def write_records(results: dict[str, Any], prov: dict[str, Any], args: argparse.Namespace, folder: Path) -> list[Path]:
    """One record per table; ``clusterattack.reports.records.write_record`` when it exists, plain JSON otherwise."""
    tables = {
        "calibration": ("Query detection: match rates of the detector's parameters (no serving)", CALIBRATION_COLUMNS),
        "attacks": ("Query detection: every attack against the served victim", ATTACK_COLUMNS),
        "honest": ("Query detection: honest traffic", HONEST_COLUMNS),
        "throughput": ("Query detection: serving throughput on and off", ["policy", "images_per_s", "ratio_to_off"]),
        "evasion": ("Query detection: evasion and its cost", EVASION_COLUMNS),
    }
    labels = ("attack", "policy", "option", "stream", "dataset", "levels", "window_rows", "match_fraction", "min_contrast")
    common = {**prov, "seeds": [args.seed], "detection": results["detection"]}
    served = {"dataset": args.dataset, "eps": args.eps, "norm": "linf"}
    paths = []
    try:
        from clusterattack.reports.records import write_record
    except ImportError:
        write_record = None
    for table, (title, columns) in tables.items():
        rows = results.get(table)
        if not rows:
            continue
        # The calibration runs on its own two data sets, whatever --dataset is.
        name = f"query_detection_{table}" + ("" if table == "calibration" else f"_{args.dataset}")
        metric_keys = [c for c in columns if c not in labels]
        out_rows = []
        for r in rows:
            metrics = {k: (float(r[k]) if isinstance(r[k], bool | int | float) else r[k]) for k in metric_keys if r.get(k) is not None}
            label = {k: r[k] for k in labels if k in r}
            out_rows.append({**label, "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}})
        shared = common if table == "calibration" else {**common, **served}
        if write_record is not None:
            paths.append(write_record(name, out_rows, shared, title=title, kind="benchmark", folder=folder,
                                      columns=[(k, k) for k in labels if k in rows[0]] + [(k, k) for k in metric_keys]))  # fmt: skip
        else:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.json"
            path.write_text(json.dumps({"title": title, "common": shared, "rows": out_rows}, indent=1) + "\n")
            paths.append(path)
    return paths


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sections = set(filter(None, args.only.split(",")))
    unknown = sections - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only takes sections of {SECTIONS}, got {sorted(unknown)}")
    attacks = [a for a in args.attacks.split(",") if a]
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    detection = detection_config(args.detection)
    results: dict[str, Any] = {"detection": {k: v for k, v in dataclasses.asdict(detection).items() if k != "policy"}}
    report: list[str] = []

    if "calibrate" in sections:
        results["calibration"] = calibrate(args.seed)
        report.append("## Calibration (share of copies matching their original; distinct: share of distinct images matching any)\n")
        report.append(markdown(results["calibration"], CALIBRATION_COLUMNS))

    if sections & {"attacks", "honest", "throughput", "evasion"}:
        from clusterattack.data import load_dataset

        dataset = load_dataset(args.dataset)
        pool = max(args.train_limit, 200)
        train_x, _ = dataset.subset("train", limit=pool, seed=args.seed).as_float()
        test_x, test_y = dataset.subset("test", limit=args.n_test, seed=args.seed).as_float()
        data = Data(train_x, test_x, test_y.numpy(), dataset)
        victim = fit_soft_kmeans(dataset.subset("train").as_float()[0], dataset.num_classes, args.seed)
        nmi_pre = nmi_of(victim, test_x, data.test_y)
        log.info("victim: soft k-means, NMI %.3f on %d test images", nmi_pre, len(test_x))
        results["victim"] = {"model": "soft k-means", "nmi_test": nmi_pre, "n_test": len(test_x)}
        offline = album_offline(data, args) if "album" in attacks else None
        with serve_platform(victim, detection, args.threads) as platform_:
            if "attacks" in sections:
                results["attacks"] = [
                    attack_row(name, policy, platform_, data, args, nmi_pre, victim, offline)
                    for name in attacks for policy in ("flag", "block")
                ]  # fmt: skip
            if "honest" in sections:
                results["honest"] = honest_rows(platform_, data, args)
            if "throughput" in sections:
                results["throughput"] = throughput_rows(platform_, data, args)
            if "evasion" in sections:
                plain = {r["attack"]: r for r in results.get("attacks", []) if r["policy"] == "flag"}
                rows = []
                for plan in evasion_plan(args):
                    if plan["name"] not in attacks:
                        continue
                    name = plan.pop("name")
                    row = attack_row(name, "flag", platform_, data, args, nmi_pre, victim, offline, **plan)
                    base = plain.get(name)
                    row["plain_nmi_drop"] = None if base is None else base["nmi_drop"]
                    row["plain_queries"] = None if base is None else base["image_queries"]
                    rows.append(row)
                results["evasion"] = rows
    wall = time.perf_counter() - started
    for key, title, columns in (
        ("attacks", "Attacks against the served victim with detection (flag: let through; block: 403)", ATTACK_COLUMNS),
        ("honest", "Honest traffic (policy flag)", HONEST_COLUMNS),
        ("throughput", "Serving throughput, detection off and on (flag), same run, median of the rounds",
         ["policy", "images_per_s", "ratio_to_off", "min", "max", "rounds"]),
        ("evasion", "Evasion (policy flag)", EVASION_COLUMNS),
    ):  # fmt: skip
        if results.get(key):
            report.append(f"\n## {title}\n")
            report.append(markdown(results[key], columns))
    text = "\n".join(report)
    print(text)
    (out / "tables.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    prov = provenance(argv, wall)
    if any(results.get(k) for k in ("attacks", "honest", "evasion")):
        title = (f"Query detection on {args.dataset} (soft k-means victim, L-inf eps {args.eps:g}, "
                 f"{args.n_test} test images, {prov['date']})")  # fmt: skip
        figure(results, out / "query_detection.png", title)
        log.info("figure: %s", out / "query_detection.png")
    if not args.no_record:
        folder = Path(args.record_dir) if args.record_dir else Path(__file__).resolve().parents[1] / "docs" / "results"
        for path in write_records(results, prov, args, folder):
            log.info("record: %s", path)
        png = out / "query_detection.png"
        if png.exists():
            figures = folder.parent / "figures"
            figures.mkdir(parents=True, exist_ok=True)
            (figures / f"query_detection_{args.dataset}.png").write_bytes(png.read_bytes())
    log.info("done in %.0f s", wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
