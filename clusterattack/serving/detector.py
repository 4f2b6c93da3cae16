"""Query detection at the served victim: the shared detector actor, the replicas' gate, the policies.

The state (per-scope fingerprint windows, counts, flags, persisted in sqlite) is
:class:`~clusterattack.serving.detector_state.QueryDetector`; here it becomes one named,
detached Ray actor beside the budget ledger (:func:`get_detector`), read back from its file
when the actor restarts, so every replica of every app that shares the ledger screens through
the same history. Replicas compute the fingerprints
(:func:`~clusterattack.serving.detection.fingerprints`) and send only them
(:class:`DetectionGate`); drivers manage keys through :class:`DetectorAdmin`.

Policy is per deployment (:class:`~clusterattack.serving.detection.DetectionConfig`
``policy``): ``off`` (nothing computed), ``flag`` (metrics, the admin listing, a log line),
``block`` (a request of a flagged key, and the request that crosses the threshold, is
refused with :class:`~clusterattack.serving.errors.QueryBlocked`, HTTP 403, before the
ledger reserves anything: nothing is charged). A retried request (same request id, e.g.
after a rate-limit wait) gets its first verdict and is recorded once, so a client's retries
never match themselves.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from clusterattack.serving.detection import DetectionConfig, FingerprintSpec, fingerprints
from clusterattack.serving.detector_state import (
    KeyDetection,
    QueryDetector,
    Verdict,
    detector_db_path,
)
from clusterattack.serving.errors import QueryBlocked, ServingError, unwrap_error
from clusterattack.serving.ledger_actor import AsyncLedgerClient, _is_actor_gone

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncDetectorClient",
    "DetectionGate",
    "DetectorAdmin",
    "KeyDetection",
    "QueryDetector",
    "Verdict",
    "detector_db_path",
    "get_detector",
    "kill_detector",
]


# ---------------------------------------------------------------------- the actor
def _actor_name(ledger_config: Any) -> str:
    return f"{ledger_config.actor_name}-detector"


def get_detector(ledger_config: Any, config: DetectionConfig | None = None):
    """The detector actor beside the ledger of ``ledger_config``, created (detached) when none
    is alive; it restarts by itself and reloads its sqlite file, like the ledger."""
    import ray

    from clusterattack.serving.metrics import record_detection_flag, record_detection_screen

    options: dict[str, Any] = {
        "name": _actor_name(ledger_config),
        "namespace": ledger_config.namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": -1,
        "max_task_retries": -1,
        "num_cpus": 0,
    }
    if ledger_config.pin_to_head:
        options["resources"] = {"node:__internal_head__": 0.001}
    return (
        ray.remote(QueryDetector)
        .options(**options)
        .remote(
            detector_db_path(ledger_config.db_path),
            ledger_config.db_path,
            config or DetectionConfig(),
            on_flag=record_detection_flag,
            on_screen=record_detection_screen,
        )
    )


def kill_detector(ledger_config: Any, *, no_restart: bool = True) -> bool:
    """Kill the detector actor (its state stays on disk); False when none was running."""
    import ray

    try:
        actor = ray.get_actor(_actor_name(ledger_config), namespace=ledger_config.namespace)
    except ValueError:
        return False
    ray.kill(actor, no_restart=no_restart)
    return True


class DetectorAdmin:
    """Blocking calls on the detector actor from a driver (jobs, benchmarks, tests)."""

    def __init__(self, ledger_config: Any, config: DetectionConfig | None = None, *, timeout_s: float = 60.0) -> None:
        self._ledger_config = ledger_config
        self._config = config
        self._timeout_s = timeout_s
        self._actor = get_detector(ledger_config, config)

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        for attempt in range(3):
            try:
                return ray.get(getattr(self._actor, method).remote(*args), timeout=self._timeout_s)
            except ServingError as exc:
                raise unwrap_error(exc) from None
            except Exception as exc:
                if not _is_actor_gone(exc) or attempt == 2:
                    raise
                logger.warning("detector actor gone (%s); recreating it", type(exc).__name__)
                self._actor = get_detector(self._ledger_config, self._config)
        raise AssertionError("unreachable")

    def list_keys(self, flagged_only: bool = False) -> list[KeyDetection]:
        return self._call("list_keys", flagged_only)

    def key_status(self, key_id: str) -> KeyDetection:
        return self._call("key_status", key_id)

    def set_owner(self, key_id: str, owner: str | None) -> KeyDetection:
        return self._call("set_owner", key_id, owner)

    def clear(self, key_id: str) -> KeyDetection:
        return self._call("clear", key_id)

    def resident_bytes(self) -> int:
        return self._call("resident_bytes")

    def fingerprint_spec(self) -> FingerprintSpec:
        return self._call("fingerprint_spec")


class AsyncDetectorClient(AsyncLedgerClient):
    """The replicas' view of the detector: ``screen`` calls coalesced into waves, retried
    across the actor's death (safe: a repeated request id is recorded once)."""

    COALESCED = ("screen",)
    SERVICE = "query detector"

    def __init__(self, ledger_config: Any, config: DetectionConfig, *, attempts: int = 3) -> None:
        self.detection = config
        super().__init__(ledger_config, attempts=attempts)

    def _connect(self):
        return get_detector(self.config, self.detection)


class DetectionGate:
    """A replica's detector hook: fingerprint the request's images, screen them, apply the policy.

    ``screen`` raises :class:`QueryBlocked` under ``block`` when the key is flagged; under
    ``flag`` it logs the flag and lets the request through. Call it before the ledger
    reserves anything, so a blocked request is never charged.
    """

    def __init__(self, config: DetectionConfig, ledger_config: Any, app: str, mode: str) -> None:
        from clusterattack.serving.metrics import DetectionMetrics

        if not config.enabled:
            raise ValueError("a DetectionGate needs policy 'flag' or 'block', got 'off'")
        self.config = config
        self.policy = config.policy
        self._app = app
        self._client = AsyncDetectorClient(ledger_config, config)
        self._metrics = DetectionMetrics(app, mode)
        self._spec: FingerprintSpec | None = None

    async def spec(self) -> FingerprintSpec:
        if self._spec is None:
            spec = await self._client.call("fingerprint_spec")
            if spec.public() != self.config.spec().public():
                logger.warning(
                    "app %s asked for fingerprints %s but the shared detector uses %s: using the detector's",
                    self._app, self.config.spec().public(), spec.public(),
                )
            self._spec = spec
        return self._spec

    async def screen(self, key_hash: str, request_id: str, images: np.ndarray) -> Verdict:
        spec = await self.spec()
        loop = asyncio.get_running_loop()
        fps = await loop.run_in_executor(None, fingerprints, images, spec)
        verdict: Verdict = await self._client.call("screen", key_hash, request_id, fps, self.policy)
        self._metrics.screened(verdict)
        if verdict.newly_flagged:
            logger.warning(
                "app %s: key %s flagged by query detection (policy %s): %s",
                self._app, verdict.key_id, self.policy, verdict.reason,
            )
        if verdict.blocked:
            raise QueryBlocked(
                f"key {verdict.key_id} is blocked by query detection: {verdict.reason}; nothing was "
                f"charged; an admin can clear it (POST /admin/keys/{verdict.key_id}/detection/clear)",
                key_id=verdict.key_id,
            )
        return verdict
