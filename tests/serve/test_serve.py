"""The serving application end to end, with the official openai client against the real vLLM CPU
engine behind Ray Serve (one app for the whole session: see conftest.py)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import subprocess
import sys
import time

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


def test_models_lists_both_variants(client, served):
    assert sorted(m.id for m in client.models.list().data) == sorted(served.models)


def test_api_key_is_required(served):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(served.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(served.url + "/v1/chat/completions", headers=headers, json={"model": "mistral-code", "messages": []})
        assert r.status_code == 401
    assert httpx.get(served.url + "/-/healthz").status_code == 200  # health stays open


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
        [sys.executable, "-m", "mergeserve.cli", "serve", str(served.checkpoints["bf16"]), "--device", "gpu", "--emit-config", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    schema = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    app = schema.applications[0]
    assert app.import_path == "mergeserve.serve.builder:build_app"
    cfg = app.args["llm_configs"][0]
    assert cfg["accelerator_config"]["kind"] == "gpu" and cfg["engine_kwargs"]["max_model_len"] == 4096
    assert cfg["engine_kwargs"]["trust_remote_code"] is False
    assert schema.http_options.host == "127.0.0.1"


RESTART_DEADLINE_S = 300  # a replaced replica's engine starts in about a minute here; allow five


def _engines(served) -> list:
    import psutil

    out = []
    for p in psutil.Process(served.proc.pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.disturbs_app
def test_killed_engine_is_replaced_and_only_in_flight_requests_fail(served):
    """Runs last (``disturbs_app``, see tests/serving_fixtures.py). SIGKILL one engine process under steady load on both
    models: Serve must replace the replica and both models must answer again within
    RESTART_DEADLINE_S; a failed request must have been in flight when the engine died."""
    import signal
    import threading

    engines = _engines(served)
    assert len(engines) == 2, engines
    records, stop = [], threading.Event()

    def worker(i):
        while not stop.is_set():
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

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(5)
    t_kill = time.time()
    engines[0].send_signal(signal.SIGKILL)
    # recovery: a fresh request to each model succeeds
    recovered = {}
    while len(recovered) < 2 and time.time() - t_kill < RESTART_DEADLINE_S:
        for m in served.models:
            if m not in recovered:
                try:
                    r = httpx.post(served.url + "/v1/completions", headers=_auth(served), timeout=60,
                                   json={"model": m, "prompt": "ok", "max_tokens": 2})
                    if r.status_code == 200:
                        recovered[m] = time.time() - t_kill
                except httpx.HTTPError:
                    pass
        time.sleep(1)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(RESTART_DEADLINE_S)
    assert len(recovered) == 2, f"not serving again within {RESTART_DEADLINE_S} s: {recovered}"
    failed = [(s, e, st) for s, e, st in records if st != 200]
    late = [(round(s - t_kill, 1), st) for s, e, st in failed if s > t_kill]
    assert not late, f"requests sent after the kill failed: {late}"
    assert all(s <= t_kill <= e for s, e, _ in failed), failed  # only those in flight
    ok_after = [1 for s, e, st in records if st == 200 and s > t_kill]
    assert ok_after, "no request succeeded after the kill"
    print(f"engine killed: {len(failed)} in-flight request(s) failed; recovered in {max(recovered.values()):.0f} s")
