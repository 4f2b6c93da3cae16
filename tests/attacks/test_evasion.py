"""Evasion wrappers of query detection: what reaches the victim, what the attack gets back, the counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterattack.attacks import CountingVictim
from clusterattack.attacks.baselines import make_baseline
from clusterattack.attacks.evasion import NoisyQueries, RecallRepeats, SpreadKeys, evasion_counts
from clusterattack.serving.detection import DetectionConfig, fingerprints


def test_recall_answers_near_copies_from_memory_and_asks_the_rest(victim, blobs):
    counted = CountingVictim(victim)
    recall = RecallRepeats(counted)
    x = blobs[0][:20]
    first = recall.predict_proba(x)
    assert counted.image_queries == 20 and torch.allclose(first, victim.predict_proba(x))
    copies = torch.cat([x[:5], (x[5:10] + 0.002).clamp(0, 1)])  # exact and faint near copies
    again = recall.predict_proba(torch.cat([copies, blobs[0][20:25]]))
    assert counted.image_queries == 25  # only the 5 new images reached the victim
    assert torch.allclose(again[:10], first[:10])  # the copies got their originals' answers
    assert torch.allclose(again[10:], victim.predict_proba(blobs[0][20:25]))
    assert evasion_counts(recall) == {"recalled": 10, "keys_used": 0}
    assert (recall.image_queries, recall.calls) == (25, 2)


def test_recall_within_one_batch(victim, blobs):
    counted = CountingVictim(victim)
    recall = RecallRepeats(counted)
    x = blobs[0][:1]
    out = recall.predict_proba(torch.cat([x, x, x]))
    assert counted.image_queries == 1 and torch.allclose(out[1], out[0]) and torch.allclose(out[2], out[0])


def test_spread_puts_near_copies_on_distinct_keys(victim, blobs):
    keys = [CountingVictim(victim) for _ in range(3)]
    spread = SpreadKeys(keys)
    x = blobs[0][:1]
    out = spread.predict_proba(x.repeat(4, 1, 1, 1))
    assert [k.image_queries for k in keys] in ([2, 1, 1], [1, 2, 1], [1, 1, 2])  # the fourth copy: no free key
    assert spread.unavoidable == 1 and spread.keys_used == 3 and spread.image_queries == 4
    assert torch.allclose(out, victim.predict_proba(x).repeat(4, 1))
    # Distinct images all fit on the first key.
    spread.predict_proba(blobs[0][10:20])
    assert keys[0].image_queries >= 11


def test_spread_defeats_a_per_key_history_that_an_owner_scope_would_pool(victim, blobs):
    """What the served detector would see: per key, no copy matches; pooled, all but one do."""
    keys = [CountingVictim(victim) for _ in range(4)]
    sent: list[list[torch.Tensor]] = [[] for _ in keys]
    spread = SpreadKeys(keys)
    for k, key in enumerate(keys):
        original = key.predict_proba
        key.predict_proba = lambda x, k=k, original=original: (sent[k].append(x), original(x))[1]
    spread.predict_proba(blobs[0][:1].repeat(4, 1, 1, 1))
    cfg = DetectionConfig()
    spec = cfg.spec(salt=77)  # the server's own key, unknown to the attacker
    for batch in sent:
        assert not cfg.index().match(fingerprints(torch.cat(batch).numpy(), spec)).matched.any()
    pooled = cfg.index().match(fingerprints(torch.cat([torch.cat(b) for b in sent]).numpy(), spec))
    assert pooled.matched.sum() == 3


def test_noise_is_fresh_bounded_and_counted(victim, blobs):
    seen = []

    class Recorder:
        num_clusters, input_shape = victim.num_clusters, victim.input_shape
        image_queries, calls = 0, 0

        def predict_proba(self, x):
            seen.append(x.clone())
            self.image_queries += len(x)
            self.calls += 1
            return victim.predict_proba(x)

    noisy = NoisyQueries(Recorder(), amplitude=0.05, seed=3)
    x = blobs[0][:8]
    noisy.predict_proba(x)
    noisy.predict_proba(x)
    assert ((seen[0] - x).abs().max() <= 0.05 + 1e-6) and not torch.equal(seen[0], seen[1])
    assert seen[0].min() >= 0 and seen[0].max() <= 1
    assert (noisy.image_queries, noisy.calls) == (16, 2)


def test_an_attack_runs_unchanged_through_a_wrapper(victim, blobs):
    counted = CountingVictim(victim)
    result = make_baseline("nes", eps=0.1, max_queries=42, samples=2).run(RecallRepeats(counted), blobs[1][:4])
    assert result.adv_images.shape == blobs[1][:4].shape
    assert result.info["image_queries"] == counted.image_queries <= 4 * 42


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda v: RecallRepeats(v, margin=0), "margin must lie in"),
        (lambda v: NoisyQueries(v, amplitude=0), "amplitude must lie in"),
        (lambda v: SpreadKeys([]), "at least one victim"),
    ],
)
def test_bad_options_are_refused(victim, make, words):
    with pytest.raises(ValueError, match=words):
        make(victim)


def test_fingerprints_of_the_attackers_key_match_like_the_servers():
    """The attacker models the detector with its own key: the same copies match either way."""
    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 8, 8)).astype(np.float32)
    for salt in (1, 2):
        cfg = DetectionConfig()
        index = cfg.index()
        index.match(fingerprints(x, cfg.spec(salt)))
        again = index.match(fingerprints(np.roll(x, 1, axis=2), cfg.spec(salt)), add=False)
        assert again.matched.all()
