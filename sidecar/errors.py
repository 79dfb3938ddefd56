"""One map from error kinds to HTTP statuses, and one error envelope, for every HTTP app.

Errors anywhere in the control plane are :class:`ApiError` (or a data-plane error with a
``kind`` attribute); apps turn them into ``{"error": {"kind", "message"}}`` with the status
below. An unexpected exception is a 500 of kind ``internal`` whose message names only its type.
"""

from __future__ import annotations

import hmac
import logging
import sys

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


def token_matches(expected: str, given: str) -> bool:
    """True when no token is configured, or ``given`` equals it (constant-time)."""
    return not expected or hmac.compare_digest(expected.encode(), given.encode())


def check_bearer(request: Request, expected: str) -> None:
    """Raise a 401 ApiError unless the request carries ``Authorization: Bearer <expected>``
    (no-op when no token is configured)."""
    if not expected:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token_matches(expected, given.strip()):
        raise ApiError("unauthorized", "this endpoint needs 'Authorization: Bearer <token>' "
                                       "with the fleet's API token")


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
    response = error_response(kind, str(getattr(exc, "detail", "")) or kind.replace("_", " "))
    response.headers.update(getattr(exc, "headers", None) or {})  # e.g. a 405's Allow
    return response


# Largest JSON body accepted: 10 MB is refused; a 1M-token list of real vocabulary ids fits.
MAX_BODY_BYTES = 8 << 20


def _non_negative_int(raw: str) -> int | None:
    """``raw`` as an int if it is ASCII digits only (``str.isdigit`` also takes "²" and
    other Unicode digits, which ``int`` refuses), capped at ``sys.maxsize``; else None."""
    if not (raw.isascii() and raw.isdigit()):
        return None
    return int(raw) if len(raw) < 19 else sys.maxsize


def query_limit(request: Request, default: int) -> int:
    """The ``limit`` query parameter: a non-negative integer (huge values mean "all").

    Raises:
        ApiError: 400 if it is anything else.
    """
    raw = request.query_params.get("limit", str(default))
    limit = _non_negative_int(raw)
    if limit is None:
        raise ApiError("bad_request", f"limit must be a non-negative integer, got {raw!r}")
    return limit


async def read_json(request: Request, type_: type, max_bytes: int = MAX_BODY_BYTES):
    """Decode a JSON request body strictly into ``type_``.

    Raises:
        ApiError: 415 if not JSON, 413 if larger than ``max_bytes``, 400 if malformed (not
            UTF-8, not JSON, nested too deeply) or of the wrong shape (the message names the
            offending field).
    """
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise ApiError("unsupported_media_type", f"expected application/json, got {ctype}")
    declared = _non_negative_int(request.headers.get("content-length", ""))
    if declared is not None and declared > max_bytes:
        raise ApiError("payload_too_large", f"body larger than {max_bytes} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise ApiError("payload_too_large", f"body larger than {max_bytes} bytes")
    if not body:
        raise ApiError("bad_request", "request body is empty; expected a JSON object")
    try:  # JSON is UTF-8 (RFC 8259); msgspec checks only the strings it keeps, not skipped ones
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError("bad_request", f"malformed JSON: not valid UTF-8 ({e.reason} at byte "
                                      f"{e.start})") from None
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise ApiError("bad_request", f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError("bad_request", f"malformed JSON: {e}") from None
    except RecursionError:  # msgspec's depth guard, e.g. in a skipped unknown field
        raise ApiError("bad_request", "malformed JSON: nested too deeply") from None


# Handlers every app installs: ApiError and HTTP errors get the envelope, anything else a 500.
ERROR_HANDLERS = {ApiError: api_error_handler, HTTPException: api_error_handler,
                  Exception: api_error_handler}
