"""The HTTP error answer in OpenAI's JSON, and the bearer key of a request."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from . import protocol as pr


class ApiError(Exception):
    """An OpenAI-style error answer."""

    KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 500: "server_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after, self.code = status, message, param, retry_after, code

    def response(self) -> JSONResponse:
        headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(pr.error_body(self.message, self.KINDS.get(self.status, "error"), self.status,
                                          self.param, self.code), status_code=self.status, headers=headers)


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None
