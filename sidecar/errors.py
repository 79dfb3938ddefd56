"""One map from error kinds to HTTP statuses, and one error envelope, for every HTTP app.

Errors anywhere in the control plane are :class:`ApiError` (or a data-plane error with a
``kind`` attribute); apps turn them into ``{"error": {"kind", "message"}}`` with the status
below. An unexpected exception is a 500 of kind ``internal`` whose message names only its type.
"""

from __future__ import annotations

import logging

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from sidecar.wire import ErrorBody, ErrorEnvelope

logger = logging.getLogger(__name__)

STATUS_BY_KIND: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "incompatible": 409,
    "conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "unprocessable": 422,
    "unavailable": 503,
    "timeout": 504,
    "store_full": 507,
    "transfer_failed": 502,
    "integrity": 502,
    "internal": 500,
}


class ApiError(Exception):
    """An error with a kind from :data:`STATUS_BY_KIND` and a message for the user."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind if kind in STATUS_BY_KIND else "internal"
        self.message = message

    @property
    def status(self) -> int:
        return STATUS_BY_KIND[self.kind]


_json = msgspec.json.Encoder()


def json_response(body: object, status: int = 200) -> Response:
    return Response(_json.encode(body), status_code=status, media_type="application/json")


def error_response(kind: str, message: str) -> Response:
    err = ApiError(kind, message)
    return json_response(ErrorEnvelope(ErrorBody(err.kind, err.message)), err.status)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for :class:`ApiError` and HTTP exceptions."""
    if isinstance(exc, ApiError):
        return error_response(exc.kind, exc.message)
    status = getattr(exc, "status_code", 500)
    kind = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
            413: "payload_too_large", 415: "unsupported_media_type"}.get(status)
    if kind is None:
        logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response("internal", f"internal error ({type(exc).__name__})")
    return error_response(kind, str(getattr(exc, "detail", "")) or kind.replace("_", " "))


async def read_json(request: Request, type_: type, max_bytes: int = 16 << 20):
    """Decode a JSON request body strictly into ``type_``.

    Raises:
        ApiError: 415 if not JSON, 413 if larger than ``max_bytes``, 400 if malformed or of
            the wrong shape (the message names the offending field).
    """
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype not in ("application/json", ""):
        raise ApiError("unsupported_media_type", f"expected application/json, got {ctype}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError("payload_too_large", f"body larger than {max_bytes} bytes")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise ApiError("payload_too_large", f"body larger than {max_bytes} bytes")
    if not body:
        raise ApiError("bad_request", "request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise ApiError("bad_request", f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError("bad_request", f"malformed JSON: {e}") from None


# Handlers every app installs: ApiError and HTTP errors get the envelope, anything else a 500.
ERROR_HANDLERS = {ApiError: api_error_handler, HTTPException: api_error_handler,
                  Exception: api_error_handler}
