"""The ledger as a service: one named, detached Ray actor that every replica calls.

:func:`get_ledger` finds or creates the actor that wraps the
:class:`~clusterattack.serving.ledger.BudgetLedger` of a :class:`LedgerConfig`; replicas
reach it through :class:`AsyncLedgerClient`, drivers (jobs, tests) through
:class:`LedgerAdmin`. Both recreate the actor when it died for good: the state is in its
sqlite file, so a new actor continues exactly where the old one stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from clusterattack.serving.errors import ServiceUnavailable, ServingError, unwrap_error
from clusterattack.serving.ledger import BudgetLedger
from clusterattack.serving.ledger_records import (
    IssuedKey,
    KeyStatus,
    default_ledger_path,
    hash_api_key,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LedgerConfig:
    """Where the ledger actor lives and where it keeps its state.

    ``pin_to_head`` keeps the actor on the head node, so a restart finds the sqlite file
    on the same disk; on a multi-node cluster without it the file must be on shared storage.
    """

    db_path: str = field(default_factory=default_ledger_path)
    actor_name: str = "clusterattack-budget-ledger"
    namespace: str = "clusterattack"
    reservation_ttl_s: float = 600.0
    synchronous: str = "NORMAL"
    pin_to_head: bool = True

    def __post_init__(self) -> None:
        if not self.db_path:
            raise ValueError("LedgerConfig.db_path must name a sqlite file, got an empty string")
        # Made absolute here: the actor's working directory is not the caller's.
        object.__setattr__(self, "db_path", os.path.abspath(os.path.expanduser(self.db_path)))
        if not self.actor_name:
            raise ValueError("LedgerConfig.actor_name must be non-empty")
        if not self.reservation_ttl_s > 0:
            raise ValueError(f"reservation_ttl_s must be > 0, got {self.reservation_ttl_s!r}")
        if self.synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {self.synchronous!r}")


def get_ledger(config: LedgerConfig):
    """The ledger actor named by ``config``, created (detached) when none is alive.

    The actor restarts by itself when its process dies (``max_restarts=-1``) and reloads
    the sqlite file; its calls are retried across such restarts, which is safe because
    reservations are idempotent per request id. Admin calls are not: a ``grant`` caught by
    the ledger's death after its transaction committed is applied twice; check
    ``key_status`` after a failure before granting again.
    """
    import ray

    from clusterattack.serving.metrics import record_budget_status

    options: dict[str, Any] = {
        "name": config.actor_name,
        "namespace": config.namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": -1,
        "max_task_retries": -1,
        "num_cpus": 0,
    }
    if config.pin_to_head:
        # Ray gives the head node this custom resource (ray._common.constants names it).
        options["resources"] = {"node:__internal_head__": 0.001}
    return (
        ray.remote(BudgetLedger)
        .options(**options)
        .remote(
            config.db_path,
            reservation_ttl_s=config.reservation_ttl_s,
            synchronous=config.synchronous,
            on_change=record_budget_status,
        )
    )


def kill_ledger(config: LedgerConfig, *, no_restart: bool = True) -> bool:
    """Kill the ledger actor (the state stays on disk); False when none was running."""
    import ray

    try:
        actor = ray.get_actor(config.actor_name, namespace=config.namespace)
    except ValueError:
        return False
    ray.kill(actor, no_restart=no_restart)
    return True


def _is_actor_gone(exc: BaseException) -> bool:
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorUnavailableError))


class LedgerAdmin:
    """Blocking calls on the ledger actor from a driver: jobs, notebooks, tests.

    Errors come back as the plain serving errors (NotFound, BadRequest, ...).
    """

    def __init__(self, config: LedgerConfig, *, timeout_s: float = 60.0) -> None:
        self.config = config
        self._timeout_s = timeout_s
        self._actor = get_ledger(config)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        for attempt in range(3):
            try:
                ref = getattr(self._actor, method).remote(*args, **kwargs)
                return ray.get(ref, timeout=self._timeout_s)
            except ServingError as exc:
                raise unwrap_error(exc) from None
            except Exception as exc:
                if not _is_actor_gone(exc) or attempt == 2:
                    raise
                logger.warning("ledger actor gone (%s); recreating it", type(exc).__name__)
                self._actor = get_ledger(self.config)
        raise AssertionError("unreachable")

    def create_key(self, name: str, **kwargs: Any) -> IssuedKey:
        return self._call("create_key", name, **kwargs)

    def grant(self, key_id: str, images: int) -> KeyStatus:
        return self._call("grant", key_id, images)

    def reset(self, key_id: str, budget: int | None = None) -> KeyStatus:
        return self._call("reset", key_id, budget)

    def revoke(self, key_id: str) -> KeyStatus:
        return self._call("revoke", key_id)

    def set_rate(self, key_id: str, rate_per_s: float | None, burst: float | None = None) -> KeyStatus:
        return self._call("set_rate", key_id, rate_per_s, burst)

    def key_status(self, key_id: str) -> KeyStatus:
        return self._call("key_status", key_id)

    def status(self, api_key: str) -> KeyStatus:
        return self._call("status", hash_api_key(api_key))

    def list_keys(self) -> list[KeyStatus]:
        return self._call("list_keys")

    def audit(self, key_id: str) -> dict[str, int]:
        return self._call("audit", key_id)

    def db_path(self) -> str:
        return self._call("db_path")


class AsyncLedgerClient:
    """The replicas' view of the ledger: awaitable calls that survive the actor's death.

    A ledger killed for good (``no_restart``) is recreated from the same config and
    reloads the same sqlite file; the interrupted call is then repeated, which is safe
    because every call is idempotent per request id.
    """

    # Calls a replica makes for every request: while one is on its way to the actor, the
    # next ones wait and then travel together (``reserve_many``/``commit_many``), so a
    # replica with many requests in flight pays one actor round trip per wave, not one
    # per request; a lone request goes at once, as before.
    COALESCED = ("reserve", "commit")
    SERVICE = "budget ledger"

    def __init__(self, config: LedgerConfig, *, attempts: int = 3) -> None:
        self.config = config
        self._attempts = attempts
        self._actor = self._connect()
        self._waiting: dict[str, list[tuple[tuple, asyncio.Future]]] = {m: [] for m in self.COALESCED}
        self._sending: dict[str, bool] = dict.fromkeys(self.COALESCED, False)
        self.actor_calls = 0  # round trips made (a coalesced wave counts once)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method in self.COALESCED and not kwargs:
            return await self._coalesced(method, args)
        return await self._call_once(method, *args, **kwargs)

    async def _coalesced(self, method: str, args: tuple) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting[method].append((args, future))
        if not self._sending[method]:
            self._sending[method] = True
            asyncio.ensure_future(self._send_waves(method))
        return await future

    async def _send_waves(self, method: str) -> None:
        try:
            while self._waiting[method]:
                wave, self._waiting[method] = self._waiting[method], []
                try:
                    answers = await self._call_once(f"{method}_many", [args for args, _ in wave])
                except BaseException as exc:  # the whole wave failed: each caller gets the error
                    for _, future in wave:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, future), answer in zip(wave, answers, strict=True):
                    if future.done():  # its request was cancelled meanwhile
                        continue
                    if isinstance(answer, BaseException):
                        future.set_exception(unwrap_error(answer))
                    else:
                        future.set_result(answer)
        finally:
            self._sending[method] = False

    async def _call_once(self, method: str, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(self._attempts):
            self.actor_calls += 1
            try:
                return await getattr(self._actor, method).remote(*args, **kwargs)
            except ServingError as exc:
                raise unwrap_error(exc) from None
            except Exception as exc:
                if not _is_actor_gone(exc):
                    raise
                logger.warning(
                    "ledger call %s failed (%s), attempt %d of %d; recreating the actor",
                    method, type(exc).__name__, attempt + 1, self._attempts,
                )
                await asyncio.sleep(0.2 * (attempt + 1))
                self._actor = self._connect()
        raise ServiceUnavailable(f"the {self.SERVICE} is unavailable after {self._attempts} attempts")

    def _connect(self):
        """The actor this client calls (found or created); subclasses call another one."""
        return get_ledger(self.config)
