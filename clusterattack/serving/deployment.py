"""Ray Serve deployment of one victim: FastAPI ingress, budget checks, batched model calls.

One application per (model, dataset) victim, served in ``scores`` mode (soft memberships)
or ``labels`` mode (cluster ids only). Every request, over HTTP or through a handle, goes
the same way: parse and check the images (4xx), reserve their image-queries in the
ledger (401/429, all or nothing), run the model (small requests are merged by
``@serve.batch`` into calls of up to ``max_batch_size`` images), commit the reservation,
answer with the mode's output and nothing else. A failed model call refunds its images.

HTTP API (``/<app>`` prefix; OpenAPI at ``/<app>/openapi.json``), key in ``X-API-Key``:
``POST /v1/predict`` (.npy or JSON images; ``Idempotency-Key`` makes retries free),
``GET /v1/info``, ``GET /v1/budget``, and with an admin key ``GET|POST /admin/keys``,
``POST /admin/keys/{key_id}/grant|reset|revoke``, ``GET /admin/detection`` (what query
detection saw of every key), ``POST /admin/keys/{key_id}/detection/clear|owner``.

With query detection on (``detection=DetectionConfig(policy="flag"|"block")``), a predict
request is fingerprinted and screened by the shared detector (``serving.detector``) after
it is parsed and before anything is reserved: under ``block`` a flagged key gets 403
(``QueryBlocked``) and is charged nothing.

Building, deploying and launching apps (``build_victim_app``, ``deploy_victim``,
``start_serve``, ``launch_victims``) lives in :mod:`clusterattack.serving.launch`; the names
are importable from here too.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route annotations of
# the ingress class in the replica, where Serve rebuilt the class by value and string
# annotations could no longer be resolved (``Request`` would become a query parameter).
import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Header, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from ray import serve

from clusterattack.serving import schema
from clusterattack.serving.config import MODES, AutoscalingSpec, ServeConfig
from clusterattack.serving.detection import DetectionConfig
from clusterattack.serving.errors import (
    InvalidImages,
    QuotaExceeded,
    ServingError,
    Unauthorized,
    unwrap_error,
)
from clusterattack.serving.http_common import (
    IMAGES_REQUEST_BODY,
    error_responses,
    render_serving_error,
    render_validation_error,
)
from clusterattack.serving.http_models import (
    BudgetResponse,
    CreateKeyRequest,
    DetectionResponse,
    GrantRequest,
    InfoResponse,
    IssuedKeyResponse,
    LabelsResponse,
    OwnerRequest,
    ResetRequest,
    ScoresResponse,
)
from clusterattack.serving.launch import (
    KeySpec,
    Launched,
    build_victim_app,
    check_app_name,
    deploy_victim,
    launch_victims,
    start_serve,
)
from clusterattack.serving.ledger_actor import AsyncLedgerClient, LedgerConfig
from clusterattack.serving.ledger_records import hash_api_key
from clusterattack.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
# Not X-Request-Id: Serve's proxy owns that header (its own request ids) and echoes it.
REQUEST_ID_HEADER = "Idempotency-Key"

#: A victim source: a checkpoint path, ``models:/<name>/<version>`` or registered name
#: (resolved in the replica by ``clusterattack.victims.io.load_victim``), a picklable
#: factory returning the module, or the module itself.
VictimSource = str | Callable[[], torch.nn.Module] | torch.nn.Module


api = FastAPI(
    title="clusterattack victim",
    version="1",
    description=(
        "A deep clustering model served as a budgeted black box. Every image in a "
        "predict request costs one image-query of the API key's budget."
    ),
)
api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="attacker or admin API key"
)
api.add_exception_handler(ServingError, render_serving_error)
api.add_exception_handler(RequestValidationError, render_validation_error)


_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the mode's output only: scores (N x K) or labels (N)",
        "content": {
            schema.JSON_MEDIA_TYPE: {
                "schema": {
                    "oneOf": [ScoresResponse.model_json_schema(), LabelsResponse.model_json_schema()]
                }
            },
            schema.NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **error_responses(400, 401, 403, 409, 413, 415, 422, 429),
}


# ---------------------------------------------------------------------- the deployment
# Serve serialises the ingress class when this module is imported, capturing the module
# globals its methods use at that moment: every helper they call must be defined above it.
def _require_key(api_key: str | None) -> str:
    """The stored hash of a present key; 401 when the header is missing."""
    if not api_key:
        raise Unauthorized(f"missing API key: send it in the {API_KEY_HEADER} header")
    return hash_api_key(api_key)


def _count_images(batch: list[np.ndarray]) -> int:
    return sum(len(images) for images in batch)


def load_model(source: VictimSource, device: str) -> torch.nn.Module:
    """The victim module of ``source`` on ``device``, in eval mode, contract checked."""
    if isinstance(source, str):
        try:
            from clusterattack.victims.io import load_victim
        except ImportError as exc:
            raise RuntimeError(
                f"victim source {source!r} is a string but clusterattack.victims.io.load_victim "
                f"is not importable ({exc}); pass a module or a factory instead"
            ) from exc
        model = load_victim(source, device=device)
    elif isinstance(source, torch.nn.Module):
        model = source
    elif callable(source):
        model = source()
    else:
        raise TypeError(
            f"victim source must be a path/URI string, a module or a factory, got {type(source).__name__}"
        )
    for attribute in ("num_clusters", "input_shape", "predict_proba"):
        if not hasattr(model, attribute):
            raise TypeError(f"victim {type(model).__name__} lacks {attribute!r} of the Victim contract")
    # A victim from a spec (ONNX, numpy, a foreign service) is no module: it runs where it is.
    return model.to(device).eval() if isinstance(model, torch.nn.Module) else model


@serve.deployment
@serve.ingress(api)
class VictimDeployment:
    """One replica of a served victim (see the module docstring for the request path)."""

    def __init__(
        self,
        source: VictimSource,
        config: ServeConfig,
        ledger: LedgerConfig,
        app_name: str,
        detection: DetectionConfig | None = None,
    ) -> None:
        from clusterattack.serving.detector import DetectionGate

        self._config = config
        self._app_name = app_name
        self._ledger_config = ledger
        self._detection = detection or DetectionConfig()
        self._gate = (
            DetectionGate(self._detection, ledger, app_name, config.mode) if self._detection.enabled else None
        )
        self._detector_admin = None
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self._device = torch.device(config.resolved_device)
        self._model = load_model(source, config.resolved_device)
        self._num_clusters = int(self._model.num_clusters)
        self._spec = schema.ImageSpec(
            tuple(int(d) for d in self._model.input_shape),
            config.max_images_per_request,
            config.max_request_bytes,
        )
        self._ledger = AsyncLedgerClient(ledger)
        self._metrics = ServingMetrics(app_name, config.mode)
        # One thread runs the model: the event loop stays free to parse and reserve the
        # next requests meanwhile, and two forwards never compete for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="victim-forward")
        self._infer_batched.set_max_batch_size(config.max_batch_size)
        self._infer_batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        logger.info(
            "serving %s (%s mode) on %s: %d clusters, input %s, query detection %s",
            app_name, config.mode, self._device, self._num_clusters, self._spec.input_shape,
            self._detection.policy,
        )

    # ------------------------------------------------------------------ model
    def _forward(self, images: np.ndarray) -> np.ndarray:
        if not images.flags.writeable:
            # Zero-copy from Ray's object store, read-only: a model that writes to its input
            # in place must not reach that memory (and torch warns on every batch otherwise).
            images = images.copy()
        x = torch.from_numpy(images).to(self._device)
        with torch.inference_mode():
            scores = self._model.predict_proba(x)
        if tuple(scores.shape) != (len(images), self._num_clusters):
            raise ServingError(
                f"victim returned memberships of shape {tuple(scores.shape)}, "
                f"expected {(len(images), self._num_clusters)}"
            )
        if self._config.mode == "labels":
            return scores.argmax(dim=1).to(torch.int64).cpu().numpy()
        scores = scores.to(torch.float32).cpu().numpy()
        if not np.isfinite(scores).all():
            raise ServingError("victim returned non-finite memberships")
        return scores

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.0, batch_size_fn=_count_images)
    async def _infer_batched(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(images) for images in batch]
        merged = batch[0] if len(batch) == 1 else np.concatenate(batch)
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._executor, self._forward, merged)
        return np.split(out, np.cumsum(sizes)[:-1])

    async def _infer(self, images: np.ndarray) -> np.ndarray:
        step = self._config.max_batch_size
        if len(images) <= step:
            return await self._infer_batched(images)
        # Already a full batch or more: merging would only delay it.
        loop = asyncio.get_running_loop()
        parts = [
            await loop.run_in_executor(self._executor, self._forward, images[i : i + step])
            for i in range(0, len(images), step)
        ]
        return np.concatenate(parts)

    # ------------------------------------------------------------------ request path
    async def _serve(
        self,
        endpoint: str,
        api_key: str | None,
        request_id: str | None,
        parse: Callable[[], Any],
    ) -> tuple[np.ndarray, int, str]:
        """Authenticate, parse, reserve, run, commit; metrics for every outcome."""
        started = time.perf_counter()
        images_count = 0
        try:
            key_hash = _require_key(api_key)
            request_id = schema.check_request_id(request_id) or uuid.uuid4().hex
            images = await parse()
            images_count = len(images)
            if self._gate is not None:
                # Before the reservation: a blocked request is charged nothing.
                await self._gate.screen(key_hash, request_id, images)
            digest = schema.images_digest(images)
            await self._ledger.call("reserve", key_hash, images_count, request_id, digest)
            try:
                out = await self._infer(images)
            except BaseException:
                # Shielded: a cancelled request (client gone) must still give its images back.
                await asyncio.shield(self._ledger.call("refund", key_hash, request_id))
                raise
            reservation = await self._ledger.call("commit", key_hash, request_id)
        except ServingError as exc:
            exc = unwrap_error(exc)
            counted = images_count if isinstance(exc, QuotaExceeded) else 0
            self._metrics.rejected(exc.reason, time.perf_counter() - started, endpoint, counted)
            raise exc from None
        except Exception:
            self._metrics.rejected("error", time.perf_counter() - started, endpoint)
            logger.exception("request %s on %s failed", request_id, self._app_name)
            raise
        self._metrics.served(images_count, time.perf_counter() - started, endpoint)
        return out, reservation.remaining, request_id

    async def _detector(self):
        """The detector client of the admin endpoints (the gate's, or one made on first use)."""
        if self._gate is not None:
            return self._gate._client
        if self._detector_admin is None:
            from clusterattack.serving.detector import AsyncDetectorClient

            self._detector_admin = AsyncDetectorClient(self._ledger_config, self._detection)
        return self._detector_admin

    async def _key_status(self, api_key: str | None, role: str | None) -> dict[str, Any]:
        status = await self._ledger.call("authenticate", _require_key(api_key), role)
        return status.as_dict()

    def _info(self) -> dict[str, Any]:
        return {
            "name": self._app_name,
            "mode": self._config.mode,
            "num_clusters": self._num_clusters,
            "input_shape": list(self._spec.input_shape),
            "max_images_per_request": self._spec.max_images,
            "max_request_bytes": self._spec.max_request_bytes,
            "max_batch_size": self._config.max_batch_size,
            "detection": self._detection.policy,
        }

    # ------------------------------------------------------------------ handle API
    async def predict(
        self, images: np.ndarray, api_key: str | None, request_id: str | None = None
    ) -> np.ndarray:
        """Scores (N x K float32) or labels (N int64) of float images N x C x H x W.

        Raises the typed errors of :mod:`clusterattack.serving.errors`, as over HTTP.
        """

        async def parse() -> np.ndarray:
            if not isinstance(images, np.ndarray):
                raise InvalidImages(
                    f"images must be a numpy array, got {type(images).__name__}"
                )
            return schema.check_images(images, self._spec)

        out, _, _ = await self._serve("handle", api_key, request_id, parse)
        return out

    async def info(self, api_key: str | None) -> dict[str, Any]:
        """Mode, number of clusters, input shape and request limits (any valid key)."""
        await self._key_status(api_key, None)
        return self._info()

    async def budget(self, api_key: str | None) -> dict[str, Any]:
        """The budget of an attacker key."""
        return await self._key_status(api_key, "attacker")

    # ------------------------------------------------------------------ HTTP API
    @api.post(
        "/v1/predict",
        summary="Cluster memberships (scores mode) or cluster ids (labels mode) of images",
        openapi_extra=IMAGES_REQUEST_BODY,
        responses=_PREDICT_RESPONSES,
        response_class=Response,
    )
    async def http_predict(
        self,
        request: Request,
        api_key: str | None = Security(api_key_scheme),
        request_id: str | None = Header(
            None, alias=REQUEST_ID_HEADER, description="idempotency key: a retry is not charged"
        ),
    ) -> Response:
        async def parse() -> np.ndarray:
            body = await schema.read_body(request, self._spec.max_request_bytes)
            return schema.parse_images(body, request.headers.get("content-type"), self._spec)

        out, remaining, request_id = await self._serve("http", api_key, request_id, parse)
        headers = {REQUEST_ID_HEADER: request_id, "X-Budget-Remaining": str(remaining)}
        if schema.NPY_MEDIA_TYPE in request.headers.get("accept", ""):
            return Response(schema.to_npy(out), media_type=schema.NPY_MEDIA_TYPE, headers=headers)
        return JSONResponse({self._config.mode: out.tolist()}, headers=headers)

    @api.get("/v1/info", response_model=InfoResponse, responses=error_responses(401))
    async def http_info(self, api_key: str | None = Security(api_key_scheme)) -> dict[str, Any]:
        return await self.info(api_key)

    @api.get("/v1/budget", response_model=BudgetResponse, responses=error_responses(401, 403))
    async def http_budget(self, api_key: str | None = Security(api_key_scheme)) -> dict[str, Any]:
        return await self.budget(api_key)

    @api.get(
        "/admin/keys", response_model=list[BudgetResponse], responses=error_responses(401, 403)
    )
    async def http_list_keys(self, api_key: str | None = Security(api_key_scheme)) -> list[dict]:
        await self._key_status(api_key, "admin")
        return [status.as_dict() for status in await self._ledger.call("list_keys")]

    @api.post(
        "/admin/keys",
        status_code=201,
        response_model=IssuedKeyResponse,
        responses=error_responses(400, 401, 403, 409),
    )
    async def http_create_key(
        self, body: CreateKeyRequest, api_key: str | None = Security(api_key_scheme)
    ) -> dict[str, Any]:
        await self._key_status(api_key, "admin")
        issued = await self._ledger.call(
            "create_key",
            body.name,
            budget=body.budget,
            rate_per_s=body.rate_per_s,
            burst=body.burst,
            role=body.role,
        )
        return issued.as_dict()

    @api.post(
        "/admin/keys/{key_id}/grant",
        response_model=BudgetResponse,
        responses=error_responses(400, 401, 403, 404),
    )
    async def http_grant(
        self, key_id: str, body: GrantRequest, api_key: str | None = Security(api_key_scheme)
    ) -> dict[str, Any]:
        await self._key_status(api_key, "admin")
        return (await self._ledger.call("grant", key_id, body.images)).as_dict()

    @api.post(
        "/admin/keys/{key_id}/reset",
        response_model=BudgetResponse,
        responses=error_responses(400, 401, 403, 404),
    )
    async def http_reset(
        self, key_id: str, body: ResetRequest, api_key: str | None = Security(api_key_scheme)
    ) -> dict[str, Any]:
        await self._key_status(api_key, "admin")
        return (await self._ledger.call("reset", key_id, body.budget)).as_dict()

    @api.get(
        "/admin/detection",
        response_model=list[DetectionResponse],
        responses=error_responses(401, 403),
        summary="What query detection saw of every attacker key (flagged keys first)",
    )
    async def http_list_detection(
        self, flagged: bool = False, api_key: str | None = Security(api_key_scheme)
    ) -> list[dict]:
        await self._key_status(api_key, "admin")
        client = await self._detector()
        return [status.as_dict() for status in await client.call("list_keys", flagged)]

    @api.post(
        "/admin/keys/{key_id}/detection/clear",
        response_model=DetectionResponse,
        responses=error_responses(401, 403, 404),
        summary="Unflag the key's scope and forget its fingerprints",
    )
    async def http_clear_detection(
        self, key_id: str, api_key: str | None = Security(api_key_scheme)
    ) -> dict[str, Any]:
        await self._key_status(api_key, "admin")
        client = await self._detector()
        return (await client.call("clear", key_id)).as_dict()

    @api.post(
        "/admin/keys/{key_id}/detection/owner",
        response_model=DetectionResponse,
        responses=error_responses(401, 403, 404, 422),
        summary="Set the key's owner: keys of one owner share one detection history and flag",
    )
    async def http_set_owner(
        self, key_id: str, body: OwnerRequest, api_key: str | None = Security(api_key_scheme)
    ) -> dict[str, Any]:
        await self._key_status(api_key, "admin")
        client = await self._detector()
        return (await client.call("set_owner", key_id, body.owner)).as_dict()

    @api.post(
        "/admin/keys/{key_id}/revoke",
        response_model=BudgetResponse,
        responses=error_responses(401, 403, 404),
    )
    async def http_revoke(
        self, key_id: str, api_key: str | None = Security(api_key_scheme)
    ) -> dict[str, Any]:
        await self._key_status(api_key, "admin")
        return (await self._ledger.call("revoke", key_id)).as_dict()


__all__ = [
    "MODES",
    "AutoscalingSpec",
    "DetectionConfig",
    "KeySpec",
    "Launched",
    "ServeConfig",
    "VictimDeployment",
    "build_victim_app",
    "check_app_name",
    "deploy_victim",
    "launch_victims",
    "load_model",
    "start_serve",
]
