"""The training cache: one build per fingerprint, even when two callers miss it at once."""

from __future__ import annotations

import threading
import time

import torch

from clusterattack.victims.training import TrainContext, cached


def test_two_callers_missing_the_same_entry_build_it_once(tmp_path):
    ctx = TrainContext(device="cpu", cache_dir=tmp_path, progress=False)
    fingerprint = {"kind": "toy", "seed": 3}
    builds: list[int] = []
    started = threading.Event()

    def build(child: TrainContext) -> dict:
        builds.append(threading.get_ident())
        started.set()
        time.sleep(0.5)  # long enough for the other caller to reach the lock
        return {"weights": torch.arange(4.0) + len(builds)}

    answers: dict[str, tuple[dict, bool]] = {}

    def call(name: str) -> None:
        answers[name] = cached(ctx, "toy", fingerprint, build)

    first = threading.Thread(target=call, args=("first",))
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=call, args=("second",))
    second.start()
    first.join(10)
    second.join(10)

    assert len(builds) == 1
    (r1, c1), (r2, c2) = answers["first"], answers["second"]
    assert (c1, c2) == (False, True)
    assert torch.equal(r1["weights"], r2["weights"])
    assert len(list(tmp_path.glob("toy-*.pt"))) == 1


def test_another_fingerprint_is_built_while_an_entry_is_being_built(tmp_path):
    ctx = TrainContext(device="cpu", cache_dir=tmp_path, progress=False)
    release = threading.Event()

    def slow(child: TrainContext) -> dict:
        release.wait(5)
        return {"v": 1}

    holder = threading.Thread(target=cached, args=(ctx, "toy", {"seed": 1}, slow))
    holder.start()
    t0 = time.monotonic()
    result, was_cached = cached(ctx, "toy", {"seed": 2}, lambda child: {"v": 2})
    waited = time.monotonic() - t0
    release.set()
    holder.join(10)
    assert result == {"v": 2} and was_cached is False
    assert waited < 4  # the lock is per entry, not per cache folder
