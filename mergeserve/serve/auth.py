"""The bearer-key check on every HTTP port Ray Serve opens behind HAProxy.

HAProxy checks the key first (serve/haproxy.py), but each model's replica also listens on its
own port (Ray's direct ingress), and Serve's fallback proxy on another: a request sent straight
to one of them gets the same check here. Ray applies the middlewares that
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names (this module's :func:`ray_middlewares`) around
every such server, Ray's own ``/-/routes`` included. Only ``GET /-/healthz`` stays open: HAProxy
and Serve probe it.

The key itself is never stored: the replicas get its salted sha256 (:func:`salted_key_hash`)
through their environment, the same value HAProxy compares.
"""

from __future__ import annotations

import hmac
import json
import os

from mergeserve.serve.haproxy import HEALTH_PATH, MAX_BODY_BYTES, header_hash

KEY_HASH_ENV = "MERGESERVE_KEY_SHA256"
KEY_SALT_ENV = "MERGESERVE_KEY_SALT"
MAX_BODY_ENV = "MERGESERVE_MAX_BODY_BYTES"


def _json_response(status: int, code: str, message: str, kind: str, extra: list | None = None):
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or []),
    ]}
    return start, {"type": "http.response.body", "body": body}


class KeyAndSizeCheck:
    """ASGI middleware: 401 unless exactly one ``Authorization`` header matches the key's hash;
    413 for a declared body over the limit. Reads its settings from the environment (see above)."""

    def __init__(self, app):
        self.app = app
        self.key_hash = os.environ.get(KEY_HASH_ENV) or None
        self.salt = os.environ.get(KEY_SALT_ENV, "")
        self.max_body = int(os.environ.get(MAX_BODY_ENV, MAX_BODY_BYTES))

    def _refusal(self, scope) -> tuple[dict, dict] | None:
        if scope.get("path") == HEALTH_PATH and scope.get("method") == "GET":
            return None
        headers = scope.get("headers") or []
        if self.key_hash:
            keys = [v for k, v in headers if k == b"authorization"]
            given = header_hash(keys[0], self.salt) if len(keys) == 1 else ""
            if not hmac.compare_digest(given, self.key_hash):
                return _json_response(401, "invalid_api_key", "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                      "authentication_error", [(b"www-authenticate", b"Bearer")])
        for k, v in headers:
            if k == b"content-length" and (not v.isdigit() or int(v) > self.max_body):
                return _json_response(413, "request_too_large", f"request body over {self.max_body} bytes", "invalid_request_error")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (refusal := self._refusal(scope)) is not None:
            for message in refusal:
                await send(message)
            return
        await self.app(scope, receive, send)


def ray_middlewares():
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` target: the middlewares for Serve's HTTP servers."""
    from starlette.middleware import Middleware

    return [Middleware(KeyAndSizeCheck)]
