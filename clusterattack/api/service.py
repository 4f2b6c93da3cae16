"""The photo-album clustering service on Ray Serve: the shape of the decision-only API the paper attacked.

Face++'s album API, as used in the paper: create an album (a token comes back), add
images to it, group the album, read the album's detail (one group id per image). The
clustering behind it is not disclosed: any registered victim (its cluster ids) or a
feature extractor followed by k-means or agglomerative clustering, with the group count
chosen by the service (see ``grouping``). Answers carry group ids, image ids and counts,
never a score.

It runs behind the serving layer's keys, budgets and rate limits (the same ledger actor,
``X-API-Key`` header and typed 4xx/429 errors). Charging: every image added costs one
image-query, reserved before the model runs and refunded if it fails; an add retried
with the same ``Idempotency-Key`` is not charged again and adds nothing twice. Grouping,
reading and deleting are free: the model ran when the images were added, a group call
only clusters those records and is deterministic, so repeating it reveals nothing new.

HTTP API (``/<app>`` prefix; OpenAPI at ``/<app>/openapi.json``):
``POST /v1/albums`` -> 201 token, ``GET /v1/albums``, ``POST /v1/albums/{token}/images``
(.npy or JSON images), ``POST /v1/albums/{token}/group``, ``GET /v1/albums/{token}``,
``DELETE /v1/albums/{token}``, ``GET /v1/info``, ``GET /v1/budget``. Albums are kept by
``store`` (limits and what they survive are stated there); ``launch`` deploys this.

With query detection on (``detection=DetectionConfig(policy=...)``, see
``serving.detector``), the images of an add are screened by the detector shared with the
victim apps on the same ledger before anything is reserved; under ``block`` a flagged key
gets 403 and is charged nothing.
"""

# No ``from __future__ import annotations``: FastAPI reads the route annotations in the
# replica, where string annotations could not be resolved (see serving.deployment).
import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Header, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from ray import serve

from clusterattack.api.config import AlbumServiceConfig
from clusterattack.api.grouping import GroupingSpec
from clusterattack.api.http_models import (
    AddImagesResponse,
    AlbumDetail,
    AlbumServiceInfo,
    AlbumSummary,
    CreateAlbumRequest,
)
from clusterattack.api.store import AsyncAlbumStore
from clusterattack.serving import schema
from clusterattack.serving.deployment import API_KEY_HEADER, REQUEST_ID_HEADER
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
from clusterattack.serving.http_models import BudgetResponse
from clusterattack.serving.ledger_actor import AsyncLedgerClient, LedgerConfig
from clusterattack.serving.ledger_records import hash_api_key
from clusterattack.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

__all__ = ["AlbumDeployment", "ModelSource", "load_grouping_model", "store_actor_name"]

#: A model source: a path, ``models:/`` URI or registered name (``victims.io.load_victim``),
#: a picklable factory returning the module, or the module itself.
ModelSource = str | Callable[[], torch.nn.Module] | torch.nn.Module


api = FastAPI(
    title="clusterattack album service",
    version="1",
    description=(
        "Photo-album clustering: create an album, add images, group it, read each image's "
        "group id. Each image added costs one image-query of the API key's budget; grouping "
        "and reading are free. Answers hold ids and counts only."
    ),
)
api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="attacker API key")
api.add_exception_handler(ServingError, render_serving_error)
api.add_exception_handler(RequestValidationError, render_validation_error)




# ---------------------------------------------------------------------- helpers
# Serve pickles the ingress class at import with the globals its methods use: every
# helper they call is defined above it.
def store_actor_name(app_name: str) -> str:
    """Name of the album store actor of service ``app_name`` (one store per service)."""
    return f"clusterattack-albums-{app_name}"


def load_grouping_model(source: ModelSource, grouping: GroupingSpec, device: str) -> torch.nn.Module:
    """The hidden model of ``source`` on ``device`` in eval mode, checked for ``grouping``."""
    if isinstance(source, str):
        from clusterattack.victims.io import load_victim

        model = load_victim(source, device=device)
    elif isinstance(source, torch.nn.Module):
        model = source
    elif callable(source):
        model = source()
    else:
        raise TypeError(
            f"model source must be a path/URI/registered name, a module or a factory, got {type(source).__name__}"
        )
    grouping.check_model(model)
    return model.to(device).eval()


def _require_key(api_key: str | None) -> str:
    if not api_key:
        raise Unauthorized(f"missing API key: send it in the {API_KEY_HEADER} header")
    return hash_api_key(api_key)


@serve.deployment
@serve.ingress(api)
class AlbumDeployment:
    """One replica of the album service (see the module docstring for the API and charging)."""

    def __init__(
        self,
        source: ModelSource,
        config: AlbumServiceConfig,
        ledger: LedgerConfig,
        app_name: str,
        detection: DetectionConfig | None = None,
    ) -> None:
        from clusterattack.serving.detector import DetectionGate

        detection = detection or DetectionConfig()
        self._gate = DetectionGate(detection, ledger, app_name, "albums") if detection.enabled else None
        self._config = config
        self._app_name = app_name
        serve_config = config.serve
        if serve_config.torch_threads is not None:
            torch.set_num_threads(serve_config.torch_threads)
        self._device = torch.device(serve_config.resolved_device)
        self._grouping = config.grouping
        self._model = load_grouping_model(source, config.grouping, serve_config.resolved_device)
        self._spec = schema.ImageSpec(
            tuple(int(d) for d in self._model.input_shape),
            serve_config.max_images_per_request,
            serve_config.max_request_bytes,
        )
        self._ledger = AsyncLedgerClient(ledger)
        self._store = AsyncAlbumStore(store_actor_name(app_name), config.limits, config.store_namespace)
        self._metrics = ServingMetrics(app_name, "albums")
        # One model thread: the event loop keeps parsing and answering meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="album-model")
        logger.info(
            "album service %s on %s: grouping %s, input %s",
            app_name, self._device, config.grouping.describe(), self._spec.input_shape,
        )

    # ------------------------------------------------------------------ model work
    def _embed(self, images: np.ndarray) -> np.ndarray:
        step = self._config.serve.max_batch_size
        parts = [
            self._grouping.embed(self._model, torch.from_numpy(images[i : i + step]).to(self._device))
            for i in range(0, len(images), step)
        ]
        return np.concatenate(parts)

    async def _in_executor(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ request path
    async def _authenticate(self, api_key: str | None) -> tuple[str, str]:
        key_hash = _require_key(api_key)
        status = await self._ledger.call("authenticate", key_hash, "attacker")
        return key_hash, status.key_id

    async def _measured(self, endpoint: str, body: Callable[[], Awaitable[Any]]) -> Any:
        """Run one request with metrics for every outcome; errors leave as plain serving errors."""
        started = time.perf_counter()
        try:
            out = await body()
        except ServingError as exc:
            exc = unwrap_error(exc)
            counted = exc.requested if isinstance(exc, QuotaExceeded) else 0
            self._metrics.rejected(exc.reason, time.perf_counter() - started, endpoint, counted)
            raise exc from None
        except Exception:
            self._metrics.rejected("error", time.perf_counter() - started, endpoint)
            logger.exception("%s on %s failed", endpoint, self._app_name)
            raise
        images = out[1] if endpoint == "add" else 0
        self._metrics.served(images, time.perf_counter() - started, endpoint)
        return out

    async def _add(
        self,
        api_key: str | None,
        token: str,
        request_id: str | None,
        parse: Callable[[], Awaitable[np.ndarray]],
    ) -> tuple[dict[str, Any], int, int, str]:
        """Authenticate, parse, check room, reserve, embed, store, commit (refund on failure)."""
        key_hash, key_id = await self._authenticate(api_key)
        request_id = schema.check_request_id(request_id) or uuid.uuid4().hex
        images = await parse()
        count = len(images)
        # Checked before charging, so a full album or a foreign token costs nothing.
        await self._store.call("check_room", key_id, token, count)
        if self._gate is not None:
            # Before the reservation: a blocked add is charged nothing.
            await self._gate.screen(key_hash, f"{token}/{request_id}", images)
        # Ledger ids are per key; the album token keeps two albums' request ids apart.
        charge_id = f"{token}/{request_id}"
        reservation = await self._ledger.call(
            "reserve", key_hash, count, charge_id, schema.images_digest(images)
        )
        try:
            added = None
            if reservation.replayed:
                # A retry: the first attempt may have stored its images before the answer was lost.
                added = await self._store.call("find_request", key_id, token, request_id)
            if added is None:
                records = await self._in_executor(self._embed, images)
                added = await self._store.call("add", key_id, token, records, request_id)
        except BaseException:
            # Shielded: a cancelled request (client gone) must still give its images back.
            await asyncio.shield(self._ledger.call("refund", key_hash, charge_id))
            raise
        committed = await self._ledger.call("commit", key_hash, charge_id)
        return {"album_token": token, **added}, count, committed.remaining, request_id

    # ------------------------------------------------------------------ handle API
    async def create_album(
        self, api_key: str | None, name: str | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        """A new empty album of the key; a repeated ``request_id`` returns the same album."""

        async def body() -> dict[str, Any]:
            _, key_id = await self._authenticate(api_key)
            return await self._store.call("create", key_id, name, schema.check_request_id(request_id))

        return await self._measured("create", body)

    async def add_images(
        self, api_key: str | None, token: str, images: np.ndarray, request_id: str | None = None
    ) -> dict[str, Any]:
        """Add float images N x C x H x W in [0, 1]; one image-query each. Returns the image ids."""

        async def parse() -> np.ndarray:
            if not isinstance(images, np.ndarray):
                raise InvalidImages(f"images must be a numpy array, got {type(images).__name__}")
            return schema.check_images(images, self._spec)

        out = await self._measured("add", lambda: self._add(api_key, token, request_id, parse))
        return out[0]

    async def group_album(self, api_key: str | None, token: str) -> dict[str, Any]:
        """Group every image of the album; returns the album's summary (group count, no ids)."""

        async def body() -> dict[str, Any]:
            _, key_id = await self._authenticate(api_key)
            records = await self._store.call("records", key_id, token)
            groups = await self._in_executor(self._grouping.group, records)
            return await self._store.call("set_groups", key_id, token, groups)

        return await self._measured("group", body)

    async def album_detail(self, api_key: str | None, token: str) -> dict[str, Any]:
        """The album's summary and each image's id and group id (None until grouped)."""

        async def body() -> dict[str, Any]:
            _, key_id = await self._authenticate(api_key)
            return await self._store.call("detail", key_id, token)

        return await self._measured("detail", body)

    async def list_albums(self, api_key: str | None) -> list[dict[str, Any]]:
        async def body() -> list[dict[str, Any]]:
            _, key_id = await self._authenticate(api_key)
            return await self._store.call("list_albums", key_id)

        return await self._measured("list", body)

    async def delete_album(self, api_key: str | None, token: str) -> None:
        async def body() -> None:
            _, key_id = await self._authenticate(api_key)
            await self._store.call("delete", key_id, token)

        await self._measured("delete", body)

    async def info(self, api_key: str | None) -> dict[str, Any]:
        """Input shape and limits; nothing about the model (any valid attacker key)."""
        await self._authenticate(api_key)
        limits = self._config.limits
        return {
            "name": self._app_name,
            "input_shape": list(self._spec.input_shape),
            "max_images_per_request": self._spec.max_images,
            "max_request_bytes": self._spec.max_request_bytes,
            "max_images_per_album": limits.max_images_per_album,
            "max_albums_per_key": limits.max_albums_per_key,
            "album_ttl_s": int(limits.album_ttl_s),
            "image_query_cost": "one per image added; grouping, reading and deleting are free",
        }

    async def budget(self, api_key: str | None) -> dict[str, Any]:
        status = await self._ledger.call("authenticate", _require_key(api_key), "attacker")
        return status.as_dict()

    # ------------------------------------------------------------------ HTTP API
    @api.post(
        "/v1/albums",
        status_code=201,
        response_model=AlbumSummary,
        responses=error_responses(400, 401, 403, 409, 422),
        summary="Create an empty album; its token addresses it from now on",
    )
    async def http_create(
        self,
        body: CreateAlbumRequest | None = None,
        api_key: str | None = Security(api_key_scheme),
        request_id: str | None = Header(None, alias=REQUEST_ID_HEADER, description="a retry returns the same album"),
    ) -> dict[str, Any]:
        return await self.create_album(api_key, body.name if body else None, request_id)

    @api.get("/v1/albums", response_model=list[AlbumSummary], responses=error_responses(401, 403))
    async def http_list(self, api_key: str | None = Security(api_key_scheme)) -> list[dict[str, Any]]:
        return await self.list_albums(api_key)

    @api.post(
        "/v1/albums/{album_token}/images",
        response_model=AddImagesResponse,
        openapi_extra=IMAGES_REQUEST_BODY,
        responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 429),
        summary="Add images (.npy or JSON, N x C x H x W floats in [0, 1]); one image-query each",
    )
    async def http_add(
        self,
        album_token: str,
        request: Request,
        api_key: str | None = Security(api_key_scheme),
        request_id: str | None = Header(
            None, alias=REQUEST_ID_HEADER, description="idempotency key: a retry is neither charged nor added twice"
        ),
    ) -> JSONResponse:
        async def parse() -> np.ndarray:
            body = await schema.read_body(request, self._spec.max_request_bytes)
            return schema.parse_images(body, request.headers.get("content-type"), self._spec)

        out, _, remaining, request_id = await self._measured(
            "add", lambda: self._add(api_key, album_token, request_id, parse)
        )
        headers = {REQUEST_ID_HEADER: request_id, "X-Budget-Remaining": str(remaining)}
        return JSONResponse(out, headers=headers)

    @api.post(
        "/v1/albums/{album_token}/group",
        response_model=AlbumSummary,
        responses=error_responses(401, 403, 404, 409),
        summary="Group every image of the album (free); read the groups with GET",
    )
    async def http_group(
        self, album_token: str, api_key: str | None = Security(api_key_scheme)
    ) -> dict[str, Any]:
        return await self.group_album(api_key, album_token)

    @api.get(
        "/v1/albums/{album_token}",
        response_model=AlbumDetail,
        responses=error_responses(401, 403, 404),
        summary="The album's images with their group ids",
    )
    async def http_detail(
        self, album_token: str, api_key: str | None = Security(api_key_scheme)
    ) -> dict[str, Any]:
        return await self.album_detail(api_key, album_token)

    @api.delete(
        "/v1/albums/{album_token}",
        status_code=204,
        response_class=Response,
        responses=error_responses(401, 403, 404),
    )
    async def http_delete(
        self, album_token: str, api_key: str | None = Security(api_key_scheme)
    ) -> Response:
        await self.delete_album(api_key, album_token)
        return Response(status_code=204)

    @api.get("/v1/info", response_model=AlbumServiceInfo, responses=error_responses(401, 403))
    async def http_info(self, api_key: str | None = Security(api_key_scheme)) -> dict[str, Any]:
        return await self.info(api_key)

    @api.get("/v1/budget", response_model=BudgetResponse, responses=error_responses(401, 403))
    async def http_budget(self, api_key: str | None = Security(api_key_scheme)) -> dict[str, Any]:
        return await self.budget(api_key)
