"""Hostile clients against the served app (HAProxy + the replicas, real engines): bad requests
get a 4xx at once and nothing else, floods and big bodies leave keyed requests served, memory
stays flat, nothing listens beyond loopback and the key is never handed to Ray in clear."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from mergeserve.serve.haproxy import SLOW_REQUEST_S

pytestmark = pytest.mark.slow

FLOOD_CONNECTIONS = 21_000  # over the 20,000, and over HAProxy's maxconn


def _auth(served) -> dict:
    return {"Authorization": f"Bearer {served.api_key}"}


def _tree_rss(served) -> int:
    total = 0
    for p in [psutil.Process(served.proc.pid), *psutil.Process(served.proc.pid).children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _host_port(served) -> tuple[str, int]:
    host, port = served.url.removeprefix("http://").split(":")
    return host, int(port)


def _ok(served, model: str | None = None, timeout: float = 120) -> int:
    r = httpx.post(served.url + "/v1/completions", headers=_auth(served), timeout=timeout,
                   json={"model": model or served.models[1], "prompt": "ok", "max_tokens": 2})
    return r.status_code


def test_idle_connection_is_dropped(served):
    with socket.create_connection(_host_port(served)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        s.settimeout(SLOW_REQUEST_S + 20)
        t0 = time.time()
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        assert time.time() - t0 < SLOW_REQUEST_S + 15
        assert data == b"" or data.startswith(b"HTTP/1.1 408")


FLOOD = """
import resource, socket, sys, time
host, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 100), hard))
socks = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    socks.append(s)
print(len(socks), flush=True)
time.sleep(hold)
"""


def test_flood_of_idle_connections_leaves_keyed_requests_served(served):
    host, port = _host_port(served)
    hold = 45
    per = FLOOD_CONNECTIONS // 2
    floods = [subprocess.Popen([sys.executable, "-c", FLOOD, host, str(port), str(per), str(hold)], stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        opened = sum(int(f.stdout.readline()) for f in floods)
        assert opened >= FLOOD_CONNECTIONS
        t0 = time.time()
        codes = [_ok(served, timeout=90) for _ in range(3)]  # while the idle sockets are held
        assert codes == [200, 200, 200] and time.time() - t0 < hold
    finally:
        for f in floods:
            f.kill()
            f.wait(30)
    assert _ok(served) == 200


def test_bodies_over_the_limit_get_413_before_they_are_read(served):
    before = _tree_rss(served)
    for _ in range(4):
        with socket.create_connection(_host_port(served)) as s:  # announces 200 MB, sends none of it
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + served.api_key.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n")
            s.settimeout(10)
            assert s.recv(4096).startswith(b"HTTP/1.1 413")
    r = httpx.post(served.url + "/v1/completions", headers=_auth(served), timeout=30,
                   json={"model": served.models[1], "prompt": "x" * 300_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert _tree_rss(served) - before < 200 << 20


def test_a_body_without_a_json_content_type_is_refused_at_once(served):
    t0 = time.time()
    r = httpx.post(served.url + "/v1/completions", headers=_auth(served), content=b'{"model": "mistral-code", "prompt": "hi"}')
    assert r.status_code == 415 and time.time() - t0 < 5  # curl -d sends a form content type
    assert r.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("path, body, words", [
    ("/v1/completions", {"prompt": "x", "n": 17}, "n must be at most 16"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "best_of": 1000}, "unknown field 'best_of'"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100_000}, "max"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": "yes"}, "add_generation_prompt"),
])
def test_requests_beyond_bounds_or_with_junk_get_an_openai_400(served, path, body, words):
    r = httpx.post(served.url + path, headers=_auth(served), timeout=60, json={"model": served.models[1], **body})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert words in err["message"] and err["type"], err


def test_unknown_model_and_parse_errors_get_openai_bodies(served):
    r = httpx.post(served.url + "/v1/completions", headers=_auth(served), json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(served.url + "/v1/completions", headers={**_auth(served), "content-type": "application/json"},
                   content=b'{"model": "mistral-code", "prompt": ')
    assert r.status_code == 400 and "error" in r.json(), r.text


def _running(served, model: str) -> float | None:
    text = httpx.get(served.metrics_url, timeout=10).text
    for line in text.splitlines():
        if line.startswith("ray_vllm_num_requests_running") and f'model_name="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    model = served.models[1]
    body = {"model": model, "prompt": "def f(x):", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", headers=_auth(served), json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: ") for x in got)
    # the stream is closed long before 3000 tokens: the engine must drop the request
    deadline, running = time.time() + 90, None
    while time.time() < deadline:
        running = _running(served, model)
        if running == 0:
            break
        time.sleep(3)
    assert running == 0, f"still running after the client left: {running}"


def test_a_thousand_bad_requests_leave_the_server_healthy_and_its_memory_flat(served):
    bad = [
        ({}, {"model": served.models[1], "prompt": "x"}),  # no key: 401 in HAProxy
        (_auth(served), {"model": "nope", "prompt": "x"}),  # 404 in HAProxy
        (_auth(served), {"model": served.models[1], "prompt": "x", "bogus": 1}),  # 400 in the replica
        (_auth(served), {"model": served.models[1], "prompt": "x", "temperature": -1}),  # 400 in vLLM
    ]
    _ok(served)
    before = _tree_rss(served)
    with httpx.Client(timeout=60) as c:
        for i in range(1000):
            headers, body = bad[i % len(bad)]
            r = c.post(served.url + "/v1/completions", content=json.dumps(body), headers={**headers, "content-type": "application/json"})
            assert 400 <= r.status_code < 500, (i, r.status_code, r.text[:200])
    assert _ok(served) == 200
    assert _tree_rss(served) - before < 100 << 20


def test_the_key_is_never_handed_to_ray_in_clear(served):
    """Every process the server started (Ray, HAProxy, replicas, engines): neither its command line
    nor its environment holds the key (they get a salted hash)."""
    key = served.api_key.encode()
    for p in psutil.Process(served.proc.pid).children(recursive=True):
        try:
            cmdline = "\0".join(p.cmdline()).encode()
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                environ = f.read()
        except (psutil.Error, OSError):
            continue
        assert key not in cmdline and key not in environ, (p.pid, p.name())
