"""The attacker's own contrastive backbone for "pretext" surrogates: cached, seeded, label-free."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from clusterattack.attacks import CountingVictim, train_generator
from clusterattack.attacks.gradients import make_gradient_source
from clusterattack.attacks.gradients.pretext import PretextSurrogate, attacker_backbone


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_the_backbone_is_cached_by_images_and_seed_and_leaves_the_rngs_alone(blobs, tmp_path):
    images = blobs[0][:96]
    _seed_all(11)
    expected = _draws()

    for attempt in ("trained", "cached"):
        _seed_all(11)
        config, state = attacker_backbone(images, epochs=1, seed=5, cache_dir=tmp_path)
        # Same draws after the call whether it trained (and seeded) or read the cache.
        assert _draws() == expected, attempt
    files = sorted(p.name for p in tmp_path.glob("attacker-pretext-*.pt"))
    assert len(files) == 1

    _, again = attacker_backbone(images, epochs=1, seed=5, cache_dir=tmp_path)
    assert all(torch.equal(state[k], again[k]) for k in state)
    _, other_seed = attacker_backbone(images, epochs=1, seed=6, cache_dir=tmp_path)
    assert any(not torch.equal(state[k], other_seed[k]) for k in state if state[k].is_floating_point())
    _, other_images = attacker_backbone(images[:64], epochs=1, seed=5, cache_dir=tmp_path)
    assert any(not torch.equal(state[k], other_images[k]) for k in state if state[k].is_floating_point())
    assert len(list(tmp_path.glob("attacker-pretext-*.pt"))) == 3

    model = PretextSurrogate(config, state, num_clusters=3)
    assert model(images[:5]).shape == (5, 3)


def test_attacker_backbone_refuses_bad_input(blobs, tmp_path):
    with pytest.raises(ValueError, match="N x C x H x W"):
        attacker_backbone(blobs[0][0], epochs=1, seed=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        attacker_backbone(blobs[0], epochs=0, seed=0, cache_dir=tmp_path)


def test_a_pretext_surrogate_attack_is_recorded_and_reproducible(victim, blobs, config, attacker_cache):
    cfg = config(gradient_source="surrogate", **{"surrogate.arch": "pretext", "surrogate.pretext_epochs": 1})
    first = train_generator(CountingVictim(victim), blobs[0], cfg, progress=False)
    assert first.source["surrogate.arch"] == "pretext"
    assert first.source["surrogate.pretext_seeds"] == str(cfg.seed + 7919)
    assert len(list(attacker_cache.glob("attacker-pretext-*.pt"))) == 1
    # The second run reads the cached backbone and must still train the same generator.
    second = train_generator(CountingVictim(victim), blobs[0], cfg, progress=False)
    for a, b in zip(first.generator.parameters(), second.generator.parameters(), strict=True):
        assert torch.equal(a, b)
    assert first.image_queries == second.image_queries > 0


def test_each_ensemble_member_trains_on_an_attacker_backbone_of_its_own(victim, blobs, config, attacker_cache):
    cfg = config(
        gradient_source="surrogate",
        **{"surrogate.arch": "pretext", "surrogate.pretext_epochs": 1, "surrogate.ensemble": 2,
           "surrogate.refresh_rounds": 0},
    )
    source = make_gradient_source(CountingVictim(victim), cfg)
    images = blobs[0]
    source.prepare(images, victim.predict_proba(images).detach())
    assert len(list(attacker_cache.glob("attacker-pretext-*.pt"))) == 2
    assert len(source.models) == 2
    # Member m starts from the cached backbone of seed pretext_seed + m: reading both back
    # from the cache trains nothing new, and the two differ.
    seeds = source.pretext_seeds()
    assert seeds == [cfg.seed + 7919, cfg.seed + 7920]
    _, own = attacker_backbone(images, epochs=1, seed=seeds[1], cache_dir=attacker_cache)
    _, base = attacker_backbone(images, epochs=1, seed=seeds[0], cache_dir=attacker_cache)
    assert len(list(attacker_cache.glob("attacker-pretext-*.pt"))) == 2  # both read from the cache
    assert any(not torch.equal(own[k], base[k]) for k in own if own[k].is_floating_point())
    assert source.describe()["surrogate.pretext_seeds"] == f"{cfg.seed + 7919},{cfg.seed + 7920}"


def test_a_resumed_pretext_surrogate_needs_neither_the_attacker_pretext_nor_its_cache(
    victim, blobs, config, attacker_cache
):
    import copy
    import shutil

    torch.set_num_threads(1)
    cfg = config(gradient_source="surrogate", **{"surrogate.arch": "pretext", "surrogate.pretext_epochs": 1})
    states = {}
    full = train_generator(
        CountingVictim(victim), blobs[0], cfg, progress=False,
        on_epoch_end=lambda r, s: states.__setitem__(s["epoch"], copy.deepcopy(s)),
    )  # fmt: skip
    # A preempted job restarted on another node: no attacker backbone cached there.
    shutil.rmtree(attacker_cache)
    resumed = train_generator(CountingVictim(victim), blobs[0], cfg, progress=False, resume=states[1])
    assert not attacker_cache.exists()  # nothing trained, nothing cached
    assert resumed.history == full.history
    for a, b in zip(full.generator.parameters(), resumed.generator.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_backbone_another_process_is_building_is_taken_up_after_the_others(blobs, tmp_path, monkeypatch):
    import shutil
    import threading
    import time

    from filelock import FileLock

    from clusterattack.attacks.gradients.pretext import attacker_backbones

    images = blobs[0][:96]
    # Seed 5's cache entry, built elsewhere first: its name, and what the other process will write.
    _, probe = attacker_backbone(images, epochs=1, seed=5, cache_dir=tmp_path / "probe")
    (entry,) = (tmp_path / "probe").glob("attacker-pretext-*.pt")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("CLUSTERATTACK_CACHE_DIR", str(cache))
    other = FileLock(str(cache / entry.with_suffix(".lock").name))
    other.acquire()  # another process is building seed 5's backbone
    got: dict = {}
    worker = threading.Thread(target=lambda: got.update(attacker_backbones(images, 1, [5, 6])))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while len(list(cache.glob("attacker-pretext-*.pt"))) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Seed 6 was built while seed 5 was held, and seed 5 is still awaited.
        assert [p.name for p in cache.glob("attacker-pretext-*.pt")] != [entry.name]
        assert len(list(cache.glob("attacker-pretext-*.pt"))) == 1 and worker.is_alive()
        shutil.copy(entry, cache / entry.name)
    finally:
        other.release()
    worker.join(120)
    assert not worker.is_alive() and sorted(got) == [5, 6]
    # Seed 5 was read from what the other process wrote, not built a second time.
    assert all(torch.equal(got[5][1][k], probe[k]) for k in probe)
    assert len(list(cache.glob("attacker-pretext-*.pt"))) == 2
