"""The serving application end to end, with the official openai client against the real vLLM CPU
engine behind Ray Serve (one app for the whole session: see conftest.py)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(served):
    return OpenAI(base_url=served.url + "/v1", api_key=served.api_key, max_retries=0, timeout=120)


def _auth(served):
    return {"Authorization": f"Bearer {served.api_key}"}


def test_models_lists_every_model(client, served):
    assert sorted(m.id for m in client.models.list().data) == sorted(served.models + served.fp8_models)


def test_api_key_is_required(served):
    two = [("authorization", f"Bearer {served.api_key}"), ("authorization", "Bearer wrong")]
    for headers in ({}, {"Authorization": "Bearer wrong"}, two):
        r = httpx.get(served.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(served.url + "/v1/chat/completions", headers=headers, json={"model": "mistral-code", "messages": []})
        assert r.status_code == 401
    assert httpx.get(served.url + "/-/routes").status_code == 401
    assert httpx.get(served.url + "/-/healthz").status_code == 200  # health stays open


def _replica_ports(served) -> list[int]:
    """The ports the models' replicas listen on themselves (Ray's direct ingress), besides HAProxy's."""
    import psutil

    ports = set()
    for p in psutil.Process(served.proc.pid).children(recursive=True):
        try:
            if "ServeReplica" in " ".join(p.cmdline()):
                ports |= {c.laddr.port for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return sorted(ports)


def test_a_replicas_own_port_checks_the_key_too(served):
    ports = _replica_ports(served)
    assert ports
    body = {"model": "mistral-code", "prompt": "hi", "max_tokens": 1}
    answered = 0
    for port in ports:
        base = f"http://127.0.0.1:{port}"
        try:
            r = httpx.post(base + "/v1/completions", json=body, timeout=30)
        except httpx.HTTPError:
            continue  # a gRPC port: not HTTP
        answered += 1
        assert r.status_code == 401, (port, r.status_code, r.text[:200])
        assert httpx.get(base + "/-/routes", timeout=10).status_code == 401
    assert answered >= 2  # at least every model's HTTP port


def _loopback(ip: str) -> bool:
    import ipaddress

    a = ipaddress.ip_address(ip)
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


def test_nothing_listens_beyond_loopback(served):
    import psutil

    family = [psutil.Process(served.proc.pid), *psutil.Process(served.proc.pid).children(recursive=True)]
    outside = []
    for p in family:
        try:
            for c in p.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN and not _loopback(c.laddr.ip):
                    outside.append((p.name(), " ".join(p.cmdline())[:60], c.laddr))
        except psutil.Error:
            pass
    assert not outside, outside


@pytest.mark.parametrize("model", ["marcoro14-tiny", "mistral-code"])
def test_chat_and_completion(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=16, temperature=0)
    assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    c = client.completions.create(model=model, prompt="import os\nimport", max_tokens=8, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 8 or c.choices[0].finish_reason == "stop"


def test_the_variants_are_different_models(client):
    kw = dict(prompt="The quick brown", max_tokens=12, temperature=0)
    a = client.completions.create(model="marcoro14-tiny", **kw).choices[0].text
    b = client.completions.create(model="mistral-code", **kw).choices[0].text
    assert a != b


def test_streaming_reports_usage(client):
    stream = client.chat.completions.create(
        model="marcoro14-tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert pieces and usage is not None and usage.completion_tokens == len(pieces) or usage.completion_tokens > 0


FP8_PROMPTS = ["def add(a, b):", "The quick brown", "import numpy as np\n", "Once upon a time", "class Stack:\n    def"]


def test_fp8_served_by_the_plugin_gives_the_tokens_of_its_dequantized_copy(client, served):
    """The FP8 merge (mergeserve's CPU kernel: --fp8-kernel mergeserve) against the same weights
    dequantized to a plain bf16 checkpoint: same greedy tokens, first tokens' logprobs close."""
    fp8, deq = served.fp8_models
    for prompt in FP8_PROMPTS:
        a, b = (client.completions.create(model=m, prompt=prompt, max_tokens=16, temperature=0, logprobs=5).choices[0]
                for m in (fp8, deq))
        assert a.logprobs.tokens == b.logprobs.tokens, prompt
        for la, lb in zip(a.logprobs.top_logprobs[:4], b.logprobs.top_logprobs[:4]):
            for tok in set(la) & set(lb):
                assert abs(la[tok] - lb[tok]) < 0.05, (prompt, tok, la[tok], lb[tok])


def test_the_log_names_the_fp8_kernel(served):
    """The engine's log says which kernel serves the FP8 layers (Ray's log files of this server)."""
    import psutil

    session = None
    for p in psutil.Process(served.proc.pid).children(recursive=True):
        try:
            session = next((a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--session_dir=")), session)
        except psutil.Error:
            pass
    assert session, "no Ray session directory found"
    logs = "".join(f.read_text(errors="replace") for f in Path(session, "logs").glob("**/*") if f.is_file() and f.suffix in (".err", ".out", ".log"))
    assert "block-FP8 linear layers served by MergeserveCpuFp8BlockKernel" in logs


BAD = {
    "unknown model": ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    "prompt longer than the context": ("/v1/completions", {"model": "mistral-code", "prompt": "hello " * 5000, "max_tokens": 4}, 400),
    "max_tokens beyond the context": ("/v1/completions", {"model": "mistral-code", "prompt": "hi", "max_tokens": 100000}, 400),
    "wrong type": ("/v1/completions", {"model": "mistral-code", "prompt": "hi", "max_tokens": "many"}, 400),
    "negative temperature": ("/v1/completions", {"model": "mistral-code", "prompt": "hi", "max_tokens": 4, "temperature": -1}, 400),
    "NaN top_p": ("/v1/completions", {"model": "mistral-code", "prompt": "hi", "max_tokens": 4, "top_p": math.nan}, 400),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_4xx_and_the_server_keeps_serving(case, served, client):
    path, body, status = BAD[case]
    content = json.dumps(body, allow_nan=True).encode()
    r = httpx.post(served.url + path, content=content, headers={**_auth(served), "content-type": "application/json"}, timeout=60)
    assert r.status_code == status, (r.status_code, r.text[:300])
    if r.status_code != 404:
        assert "error" in r.json() and r.json()["error"]["message"]
    assert client.completions.create(model="mistral-code", prompt="ok", max_tokens=2).choices


def test_malformed_json(served, client):
    r = httpx.post(served.url + "/v1/chat/completions", content=b"{not json", headers={**_auth(served), "content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert client.models.list().data


def test_bounded_load_has_no_5xx(served):
    def one(i):
        r = httpx.post(
            served.url + "/v1/completions", headers=_auth(served), timeout=300,
            json={"model": served.models[i % 2], "prompt": f"def f{i}(x):", "max_tokens": 8},
        )
        return r.status_code

    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes.count(200) == 200, {c: codes.count(c) for c in set(codes)}


def test_prometheus_metrics_per_model(served, client):
    client.completions.create(model="mistral-code", prompt="x", max_tokens=4)
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        try:
            text = httpx.get(served.metrics_url, timeout=10).text
        except httpx.HTTPError:
            text = ""
        if "ray_serve_num_http_requests" in text and 'model_name="mistral-code"' in text:
            break
        time.sleep(3)
    assert "ray_serve_num_http_requests" in text
    assert 'model_name="mistral-code"' in text and "vllm" in text


def test_emit_config_is_a_valid_serve_config(served, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    p = subprocess.run(
        [sys.executable, "-m", "mergeserve.cli", "serve", str(served.checkpoints["bf16"]), str(served.checkpoints["code"]),
         "--name", "a", "--name", "org/b", "--device", "gpu", "--api-key", "the-key", "--emit-config", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert "the-key" not in text  # only its salted hash
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert [a.route_prefix for a in schema.applications] == ["/_m/a", "/_m/org--b"]
    for app in schema.applications:
        assert app.import_path == "mergeserve.serve.builder:build_model_app"
        cfg = app.args["llm_config"]
        assert cfg["accelerator_config"]["kind"] == "gpu" and cfg["engine_kwargs"]["max_model_len"] == 4096
        assert cfg["engine_kwargs"]["trust_remote_code"] is False
        assert cfg["runtime_env"]["env_vars"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert schema.http_options.host == "127.0.0.1"
    assert schema.controller_options.runtime_env["env_vars"]["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("mergeserve-haproxy")
    # the builder turns each entry into a Serve application (what `serve deploy` does with it)
    from mergeserve.serve.builder import build_model_app

    assert build_model_app(schema.applications[0].args) is not None


RESTART_DEADLINE_S = 300  # a replaced replica's engine starts in about a minute here; allow five


def _engine_of(served, model: str):
    """The VLLM::EngineCore process serving ``model`` (a child of that model's replica, whose
    process title is ``ray::ServeReplica:<app>:LLMServer:<model>``, a method name after it while it
    runs one; the name alone would also match ``<model>-fp8``)."""
    import psutil

    for p in psutil.Process(served.proc.pid).children(recursive=True):
        try:
            if "EngineCore" not in " ".join(p.cmdline()):
                continue
            title = " ".join(p.parent().cmdline()).strip()  # Ray pads a process title with empty arguments
            if re.search(rf":LLMServer:{re.escape(model)}(\.\w+)?$", title):
                return p
        except psutil.Error:
            pass
    raise AssertionError(f"no engine process found for {model}")


@pytest.mark.disturbs_app  # run after every other test of the served app (tests/serving_fixtures.py)
def test_killed_engine_is_replaced_and_only_in_flight_requests_fail(served):
    """SIGKILL one engine process under steady load on two models: Serve must replace the
    replica and both models must answer again within RESTART_DEADLINE_S. A request in flight when
    the engine died may fail; one sent after it must be held (its replica ends itself, HAProxy
    sends the request on to Serve's proxy, which waits for the replacement) and then answered,
    never refused or failed."""
    import signal
    import threading

    engines = [_engine_of(served, served.models[0])]
    records, stop = [], threading.Event()

    def send(i):
        t0 = time.time()
        try:
            r = httpx.post(
                served.url + "/v1/completions", headers=_auth(served), timeout=RESTART_DEADLINE_S,
                json={"model": served.models[i % 2], "prompt": f"x{i}", "max_tokens": 16},
            )
            status = r.status_code
        except httpx.HTTPError:
            status = -1
        records.append((t0, time.time(), status))

    def worker(i):
        while not stop.is_set():
            send(i)

    def newcomers():  # the killed model's workers wait on their requests: new ones arrive meanwhile
        while not stop.is_set():
            threads.append(threading.Thread(target=send, args=(0,), daemon=True))
            threads[-1].start()
            time.sleep(2)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(5)
    t_kill = time.time()
    engines[0].send_signal(signal.SIGKILL)
    arrivals = threading.Thread(target=newcomers, daemon=True)
    arrivals.start()
    # recovery: a request to each model sent right after the kill is held until it can be answered
    recovered, probes = {}, {}

    def probe(m):
        try:
            r = httpx.post(served.url + "/v1/completions", headers=_auth(served), timeout=RESTART_DEADLINE_S,
                           json={"model": m, "prompt": "ok", "max_tokens": 2})
            probes[m] = r.status_code
            if r.status_code == 200:
                recovered[m] = time.time() - t_kill
        except httpx.HTTPError as e:
            probes[m] = repr(e)

    waits = [threading.Thread(target=probe, args=(m,), daemon=True) for m in served.models]
    for t in waits:
        t.start()
    for t in waits:
        t.join(RESTART_DEADLINE_S + 10)
    time.sleep(3)
    stop.set()
    arrivals.join()
    for t in threads:
        t.join(RESTART_DEADLINE_S)
    assert len(recovered) == 2, f"not serving again within {RESTART_DEADLINE_S} s: {probes}"
    failed = [(s, e, st) for s, e, st in records if st != 200]
    late = [(round(s - t_kill, 1), st) for s, e, st in failed if s > t_kill]
    assert not late, f"requests sent after the kill failed: {late}"
    assert all(s <= t_kill <= e for s, e, _ in failed), failed  # only those in flight
    ok_after = [1 for s, e, st in records if st == 200 and s > t_kill]
    assert ok_after, "no request succeeded after the kill"
    print(f"engine killed: {len(failed)} in-flight request(s) failed, {len(ok_after)} sent after it answered; "
          f"first answer after the kill per model (s): { {m: round(t) for m, t in recovered.items()} }")
