"""The HTTP API object the ingress serves (`@serve.ingress(api)`): FastAPI with the guard in front, its
error answers (JSON for every failure, never a traceback) and the OpenAPI description of the classify body;
and which failures of a model stage mean "retry" (503) rather than a bug (500), for both transports."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, OwnerDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import GuardMiddleware
from .inputs import APIError, finite
from .schemas import ClassifyJSON, ErrorBody

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="CF-ViT inference",
    description=(
        "Coarse-to-fine vision transformer behind Ray Serve. Every image runs the cheap coarse stage; "
        "it exits there when its top softmax probability reaches η, otherwise the fine stage re-splits "
        "the informative regions. `eta` ∈ [0, 1.0001] (0: always coarse; >1: always fine), or "
        "`budget_gflops` chooses η from the model's calibrated table. The same call over gRPC: "
        "serve/proto/cfvit.proto (docs/API.md)."
    ),
    version="1",
)
api.add_middleware(GuardMiddleware)  # keys, rate limit, deadline, security headers (serve/guard.py)

ERROR_RESPONSES = {s: {"model": ErrorBody} for s in (400, 413, 415, 422, 500, 503)}
BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "a raw PNG/JPEG/WebP body (Content-Type image/*), multipart form data with one or more "
                       "`file` fields, or JSON {images: [base64…], eta?, budget_gflops?}",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
        },
    }
}


def error_response(status: int, error: str, detail=None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": finite(detail)})


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError):
    return error_response(exc.status, exc.error, exc.detail)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError):
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
    return error_response(422, "invalid request parameters", detail)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException):
    response = error_response(exc.status_code, str(exc.detail), None)
    response.headers.update(exc.headers or {})  # e.g. the Allow header of a 405
    return response


def stage_unavailable(exc: BaseException) -> bool:
    """A model stage overloaded or restarting (the client may retry), as opposed to a bug.

    ObjectLost/OwnerDied: a hard image's coarse state belonged to a coarse replica that went away (scaled
    down or its node died) before the fine stage fetched it: a retry will succeed."""
    return isinstance(exc, (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                            ActorUnavailableError, RayActorError, ObjectLostError, OwnerDiedError))


async def once_more_if_replica_died(call):
    """A stage call, sent once more when the replica it went to died under it (its node lost, say): the
    router sends the second one to a live replica. Overload (BackPressureError) is not retried."""
    try:
        return await call()
    except (ActorDiedError, ActorUnavailableError) as e:
        logger.info("a model replica died under a request (%s): sending it once more", type(e).__name__)
        return await call()


def unexpected_failure(exc: Exception):
    """(status, error, detail) of a failure no check answered: 503 when a stage is unavailable, else 500
    (logged with its traceback here, never sent to the client)."""
    if stage_unavailable(exc):
        return 503, "model stage unavailable, retry later", type(exc).__name__
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return 500, "internal error", type(exc).__name__


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception):
    return error_response(*unexpected_failure(exc))
