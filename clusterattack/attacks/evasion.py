"""Attack-side evasion of stateful query detection, as wrappers of the victim an attack holds.

A served victim with query detection (``serving.detector``, Blacklight-style) flags a key
whose queries match its earlier ones. An attacker who knows the detector's recipe (the
defense is public, its hash key is not) can avoid matches without changing the attack's
code: wrap the victim. Each wrapper satisfies the Victim contract (``num_clusters``,
``input_shape``, ``predict_proba``) and forwards the query counters (``image_queries``,
``calls``) of what really reached the victim(s), so an attack and its accounting run
unchanged. What each costs (NMI drop, queries) is measured by
``benchmarks/query_detection.py``.

- :class:`RecallRepeats` ("never query a near copy of an image already asked"): the
  attacker fingerprints its own queries with the public recipe and its own key, and
  answers a query that would match an earlier one from memory (that query's answer)
  instead of asking. Finite differences and a surrogate's online steps on perturbed copies
  then learn from stale answers.
- :class:`SpreadKeys` ("spread queries over several keys"): each query goes through the
  first of several keys whose history (as the attacker models it) holds no near copy of
  it. The ledger sees keys an admin linked to one owner as one history
  (``POST /admin/keys/{key_id}/detection/owner``), which undoes this; keys of distinct
  accounts it cannot link.
- :class:`NoisyQueries` ("noisier query points"): fresh uniform noise of +-``amplitude`` on
  every query, so near copies leave their quantisation levels; the attack gets the answers
  of the noisy points. Coarser finite differences (a larger ``sigma`` of NES or SPSA) need
  no wrapper: they are the baselines' own ``sigma``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from clusterattack.serving.detection import DetectionConfig, FingerprintIndex, fingerprints
from clusterattack.victims.base import Victim

__all__ = ["EVASIONS", "NoisyQueries", "RecallRepeats", "SpreadKeys", "evasion_counts"]

#: The attacker's own hash key: its fingerprints need not equal the server's, only match alike.
_ATTACKER_SALT = 0x5EED


def _attacker_model(config: DetectionConfig | None, margin: float) -> tuple[Any, DetectionConfig]:
    """The detector as the attacker models it: the public defaults, a stricter match."""
    if not 0 < margin <= 1:
        raise ValueError(f"margin must lie in (0, 1], got {margin!r}")
    cfg = config or DetectionConfig()
    # Match sooner than the server would: its hash key differs, so the top hashes do too.
    cfg = replace(cfg, match_fraction=max(0.05, cfg.match_fraction * margin), min_shared=max(1, cfg.min_shared - 1))
    return cfg.spec(_ATTACKER_SALT), cfg


def _images(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def _counts(victims: Sequence[Any]) -> tuple[int | None, int | None]:
    images = [getattr(v, "image_queries", None) for v in victims]
    calls = [getattr(v, "calls", None) for v in victims]
    return (
        None if None in images else int(sum(images)),
        None if None in calls else int(sum(calls)),
    )


def evasion_counts(victim: Any) -> dict[str, int]:
    """What an evasion wrapper did besides asking: answers recalled, keys used (0 when none)."""
    return {
        "recalled": int(getattr(victim, "recalled", 0)),
        "keys_used": int(getattr(victim, "keys_used", 0)),
    }


class RecallRepeats:
    """Answer from memory every query that would match one of the attacker's earlier queries.

    Args:
        victim: what the attack would have queried.
        config: the detector as the attacker believes it configured (default: the public
            defaults). ``margin`` scales its match fraction down, so the attacker avoids
            near-threshold copies the server's own key might still match.
        history: queries remembered (the server's window, by default).
    """

    def __init__(
        self, victim: Victim, *, config: DetectionConfig | None = None, margin: float = 0.75, history: int | None = None
    ) -> None:
        self._victim = victim
        self.num_clusters = int(victim.num_clusters)
        self.input_shape = tuple(int(v) for v in victim.input_shape)
        self._spec, cfg = _attacker_model(config, margin)
        self._index = FingerprintIndex(
            history or cfg.history, postings=cfg.postings, match_fraction=cfg.match_fraction, min_shared=cfg.min_shared
        )
        self._answers = np.zeros((self._index.history, self.num_clusters), np.float32)
        self.recalled = 0

    @property
    def image_queries(self) -> int | None:
        return _counts([self._victim])[0]

    @property
    def calls(self) -> int | None:
        return _counts([self._victim])[1]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        images = _images(x)
        result = self._index.match(fingerprints(images, self._spec))
        ask = ~result.matched
        out = np.empty((len(images), self.num_clusters), np.float32)
        if ask.any():
            answers = self._victim.predict_proba(torch.from_numpy(images[ask]))
            out[ask] = torch.as_tensor(answers).detach().cpu().float().numpy()
        history = self._index.history
        # In row order: a recalled query's source is earlier (maybe in this batch, already filled).
        for i in range(len(images)):
            if not ask[i]:
                out[i] = self._answers[result.best_row[i] % history]
            self._answers[result.rows[i] % history] = out[i]
        self.recalled += int((~ask).sum())
        return torch.from_numpy(out)


class SpreadKeys:
    """Send each query through the first key whose history (as the attacker models it) has
    no near copy of it; when every key has one, through the key that has asked least.

    ``victims``: one victim per key (e.g. ``ServedVictim``s of one app with distinct keys).
    ``keys_used`` counts the keys that were sent anything.
    """

    def __init__(
        self, victims: Sequence[Victim], *, config: DetectionConfig | None = None, margin: float = 0.75
    ) -> None:
        if not victims:
            raise ValueError("SpreadKeys needs at least one victim (one per key), got none")
        self._victims = list(victims)
        first = self._victims[0]
        self.num_clusters = int(first.num_clusters)
        self.input_shape = tuple(int(v) for v in first.input_shape)
        self._spec, cfg = _attacker_model(config, margin)
        self._indexes = [cfg.index() for _ in self._victims]
        self._sent = np.zeros(len(self._victims), np.int64)
        self.unavoidable = 0  # queries every key's history already had a near copy of

    @property
    def image_queries(self) -> int | None:
        return _counts(self._victims)[0]

    @property
    def calls(self) -> int | None:
        return _counts(self._victims)[1]

    @property
    def keys_used(self) -> int:
        return int((self._sent > 0).sum())

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        images = _images(x)
        fps = fingerprints(images, self._spec)
        route = np.empty(len(images), np.int64)
        for i in range(len(images)):
            row = fps[i : i + 1]
            free = [k for k, index in enumerate(self._indexes) if not index.match(row, add=False).matched[0]]
            if free:
                choice = free[0]
            else:
                choice = int(np.argmin(self._sent))
                self.unavoidable += 1
            self._indexes[choice].match(row)
            self._sent[choice] += 1
            route[i] = choice
        out = np.empty((len(images), self.num_clusters), np.float32)
        for k in np.unique(route):
            rows = route == k
            answers = self._victims[k].predict_proba(torch.from_numpy(images[rows]))
            out[rows] = torch.as_tensor(answers).detach().cpu().float().numpy()
        return torch.from_numpy(out)


class NoisyQueries:
    """Ask every query with fresh uniform noise of +-``amplitude`` added (clipped to [0, 1]).

    The attack receives the noisy points' memberships as the answers to its own points.
    """

    def __init__(self, victim: Victim, *, amplitude: float = 0.1, seed: int = 0) -> None:
        if not 0 < amplitude <= 1:
            raise ValueError(f"amplitude must lie in (0, 1], got {amplitude!r}")
        self._victim = victim
        self.amplitude = float(amplitude)
        self.num_clusters = int(victim.num_clusters)
        self.input_shape = tuple(int(v) for v in victim.input_shape)
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def image_queries(self) -> int | None:
        return _counts([self._victim])[0]

    @property
    def calls(self) -> int | None:
        return _counts([self._victim])[1]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32)
        noise = (torch.rand(x.shape, generator=self._generator) * 2 - 1) * self.amplitude
        return self._victim.predict_proba((x + noise).clamp(0.0, 1.0))


#: Evasion wrappers by name (``SpreadKeys`` takes a list of victims, the others one).
EVASIONS: dict[str, type] = {"recall": RecallRepeats, "spread": SpreadKeys, "noise": NoisyQueries}
