"""The training cache: one build per fingerprint, even when two callers miss it at once."""

from __future__ import annotations

import logging
import threading

import torch

from clusterattack.victims.training import TrainContext, cached


class _WaitingForBuilder(logging.Handler):
    """Sets ``event`` when ``cached`` logs that a caller found the entry's lock taken."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "another process is building" in record.getMessage():
            self.event.set()


def _watch_training_log():
    logger = logging.getLogger("clusterattack.victims.training")
    handler = _WaitingForBuilder()
    before = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler, before


def test_two_callers_missing_the_same_entry_build_it_once(tmp_path):
    ctx = TrainContext(device="cpu", cache_dir=tmp_path, progress=False)
    fingerprint = {"kind": "toy", "seed": 3}
    builds: list[int] = []
    started = threading.Event()
    logger, waiting, level = _watch_training_log()

    def build(child: TrainContext) -> dict:
        builds.append(threading.get_ident())
        started.set()
        # Hold the entry until the second caller has found its lock taken (no sleep: the
        # contention is certain, however slow the machine).
        assert waiting.event.wait(30), "the second caller never waited for the lock"
        return {"weights": torch.arange(4.0) + len(builds)}

    answers: dict[str, tuple[dict, bool]] = {}

    def call(name: str) -> None:
        answers[name] = cached(ctx, "toy", fingerprint, build)

    try:
        first = threading.Thread(target=call, args=("first",))
        first.start()
        assert started.wait(30)
        second = threading.Thread(target=call, args=("second",))
        second.start()
        first.join(60)
        second.join(60)
    finally:
        logger.removeHandler(waiting)
        logger.setLevel(level)

    assert not first.is_alive() and not second.is_alive()
    assert waiting.event.is_set() and len(builds) == 1
    (r1, c1), (r2, c2) = answers["first"], answers["second"]
    assert (c1, c2) == (False, True)
    assert torch.equal(r1["weights"], r2["weights"])
    assert len(list(tmp_path.glob("toy-*.pt"))) == 1


def test_another_fingerprint_is_built_while_an_entry_is_being_built(tmp_path):
    ctx = TrainContext(device="cpu", cache_dir=tmp_path, progress=False)
    building = threading.Event()
    release = threading.Event()

    def slow(child: TrainContext) -> dict:
        building.set()
        release.wait(60)
        return {"v": 1}

    holder = threading.Thread(target=cached, args=(ctx, "toy", {"seed": 1}, slow))
    holder.start()
    assert building.wait(30)
    try:
        result, was_cached = cached(ctx, "toy", {"seed": 2}, lambda child: {"v": 2})
        # Returned while the first entry is still held: the lock is per entry, not per folder
        # (a folder-wide lock would block here until the holder gives up after 60 s).
        assert holder.is_alive() and not release.is_set()
    finally:
        release.set()
        holder.join(30)
    assert result == {"v": 2} and was_cached is False
