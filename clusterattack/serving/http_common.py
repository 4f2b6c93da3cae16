"""What the victim service and the album service share over HTTP: error bodies, the images request body."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from clusterattack.serving import schema
from clusterattack.serving.errors import BadRequest, ServingError, unwrap_error
from clusterattack.serving.http_models import ErrorResponse, PredictJSONRequest

__all__ = [
    "IMAGES_REQUEST_BODY",
    "error_responses",
    "render_serving_error",
    "render_validation_error",
]

#: OpenAPI request body of an endpoint that takes images as ``.npy`` bytes or JSON.
IMAGES_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            schema.NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            schema.JSON_MEDIA_TYPE: {"schema": PredictJSONRequest.model_json_schema()},
        },
    }
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: each status code answered with an ErrorResponse body."""
    return {code: {"model": ErrorResponse} for code in codes}


async def render_serving_error(request: Request, exc: ServingError) -> JSONResponse:
    """FastAPI exception handler: a serving error as its status, JSON body and headers."""
    exc = unwrap_error(exc)
    return JSONResponse(exc.to_payload(), status_code=exc.status_code, headers=exc.headers())


async def render_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI exception handler: a request that fails its model's validation, as a 422 in the
    error shape every other error uses (FastAPI's own 422 body has another shape)."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return JSONResponse(BadRequest(f"invalid request: {problems}").to_payload(), status_code=422)
