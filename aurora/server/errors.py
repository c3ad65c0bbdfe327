"""OpenAI-style errors: every failure leaves the server as `{"error": {message, type, param, code}}`.

Handlers raise `APIError`; the error middleware in `app.py` turns it (and aiohttp's own
HTTP exceptions, and anything unexpected) into a JSON response.
"""
from __future__ import annotations

from aiohttp import web

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 501: "invalid_request_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)
