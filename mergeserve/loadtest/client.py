"""One streamed request to an OpenAI-compatible endpoint, and the pre-flight check of that endpoint.

Each request is a streamed ``/v1/completions`` (or ``/v1/chat/completions``) call with
``stream_options: {"include_usage": true}``, so token counts come from the server's usage report.
The client never raises for a failed request: it returns a :class:`RequestRecord` whose ``error``
names the kind of failure:

- ``http_<status>``: the server answered with that status (401, 404, 500, ...);
- ``connect_error``: the connection could not be made (server down, port closed);
- ``timeout``: the whole request took longer than its timeout;
- ``stream_dropped``: the connection closed before the stream's end (``data: [DONE]``);
- ``stream_error``: the stream carried an ``{"error": ...}`` event;
- ``bad_response``: a stream event that is not JSON;
- ``no_usage``: the stream ended without a usage report (its token counts are unknown);
- ``cancelled``: the run was interrupted (Ctrl-C) while the request was in flight.

The HTTP client (aiohttp) ignores proxy settings from the environment and follows no redirects,
so traffic goes only to the URL given.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from mergeserve.errors import EndpointError
from mergeserve.loadtest.metrics import RequestRecord
from mergeserve.loadtest.workload import Prompt


def make_client(max_connections: int, timeout: float) -> aiohttp.ClientSession:
    """One HTTP session for a whole load test (aiohttp, as vLLM's benchmark client uses: a light
    per-chunk cost, so the client's own overhead stays out of the figures on a busy machine)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections),
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0), sock_read=timeout),
        trust_env=False,  # no proxies from the environment: traffic goes only to the URL given
    )


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def request_body(model: str, prompt: Prompt, api: str, ignore_eos: bool) -> dict:
    body = {"model": model, "max_tokens": prompt.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if ignore_eos:  # vLLM's extension: generate exactly max_tokens, so every request has the same length
        body["ignore_eos"] = True
    return body


def _content(event: dict, api: str) -> bool:
    """Does this stream event carry generated content?"""
    for c in event.get("choices") or ():
        if api == "chat":
            d = c.get("delta") or {}
            if d.get("content") or d.get("reasoning_content") or d.get("reasoning"):
                return True
        elif c.get("text"):
            return True
    return False


async def _stream(client: aiohttp.ClientSession, url: str, body: dict, hdrs: dict, api: str, rec: RequestRecord) -> None:
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    async with client.post(url + path, json=body, headers=hdrs, allow_redirects=False) as r:
        if r.status != 200:
            text = (await r.read()).decode(errors="replace")
            rec.error, rec.detail = f"http_{r.status}", _error_message(text) or (r.reason or "")
            return
        buf, finished = b"", False
        async for data in r.content.iter_any():
            now = time.perf_counter()  # every event in this read arrived now
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, SSE comments / keep-alives
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    finished, rec.done = True, now
                    break
                try:
                    event = json.loads(payload)
                except json.JSONDecodeError:
                    rec.error, rec.detail = "bad_response", f"stream event is not JSON: {payload[:120]!r}"
                    return
                if "error" in event:
                    rec.error, rec.detail = "stream_error", _error_message(json.dumps(event)) or payload[:200].decode(errors="replace")
                    return
                if _content(event, api):
                    rec.chunk_times.append(now)
                if event.get("usage"):
                    rec.prompt_tokens = event["usage"].get("prompt_tokens")
                    rec.output_tokens = event["usage"].get("completion_tokens")
            if finished:
                break
        if finished:  # read the body to its end, so the connection goes back to the pool for the next request
            try:
                await asyncio.wait_for(r.content.read(), 1.0)
            except (asyncio.TimeoutError, aiohttp.ClientError):
                pass
        if not finished:
            rec.error, rec.detail = "stream_dropped", "the stream ended without data: [DONE]"
        elif rec.output_tokens is None:
            rec.error, rec.detail = "no_usage", "no usage report in the stream (stream_options.include_usage unsupported?)"


def _error_message(text: str) -> str:
    try:
        err = json.loads(text)
        err = err.get("error", err) if isinstance(err, dict) else err
        msg = err.get("message") if isinstance(err, dict) else None
        return str(msg or err)[:200]
    except (json.JSONDecodeError, AttributeError):
        return text.strip()[:200]


async def send(client: aiohttp.ClientSession, url: str, model: str, prompt: Prompt, index: int, *, api_key: str | None,
               api: str = "completions", ignore_eos: bool = True, timeout: float = 300.0,
               on_sent=None) -> RequestRecord:
    """Send one streamed request; always returns a record (never raises for a failed request).

    ``on_sent(record)`` is called as it is sent, so an interrupted run still has the record."""
    rec = RequestRecord(index=index, sent=time.perf_counter())
    if on_sent is not None:
        on_sent(rec)
    try:
        body = request_body(model, prompt, api, ignore_eos)
        await asyncio.wait_for(_stream(client, url, body, headers(api_key), api, rec), timeout)
    except asyncio.TimeoutError:  # ours, or aiohttp's (a subclass)
        rec.error, rec.detail = "timeout", f"no complete response within {timeout:g} s"
    except aiohttp.ClientConnectorError as e:
        rec.error, rec.detail = "connect_error", str(e)[:200] or type(e).__name__
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as e:
        rec.error, rec.detail = "stream_dropped", str(e)[:200] or type(e).__name__
    except aiohttp.ClientError as e:
        rec.error, rec.detail = "http_error", f"{type(e).__name__}: {str(e)[:200]}"
    except asyncio.CancelledError:
        rec.error, rec.detail, rec.done = "cancelled", "the run was interrupted", time.perf_counter()
        raise
    if rec.done is None:  # a success ends at its [DONE]; a failure when it is known
        rec.done = time.perf_counter()
    return rec


async def preflight(url: str, models: list[str], api_key: str | None, timeout: float = 10.0) -> dict:
    """Check the endpoint before any load: reachable, accepts the key, serves every model.

    Returns the ``/v1/models`` entries by id (empty if the server has no such route).
    Raises EndpointError with one clear message otherwise."""
    async with make_client(2, timeout) as client:
        try:
            async with client.get(url + "/v1/models", headers=headers(api_key), allow_redirects=False) as r:
                status, reason, text = r.status, r.reason, (await r.read()).decode(errors="replace")
        except asyncio.TimeoutError:
            raise EndpointError(f"{url}: no answer within {timeout:g} s") from None
        except aiohttp.ClientError as e:
            raise EndpointError(f"{url}: cannot connect ({type(e).__name__}: {str(e)[:160] or 'no detail'})") from None
    if status in (401, 403):
        raise EndpointError(f"{url}: {status} {reason}: the server refused the API key "
                            f"({'none given: ' if not api_key else ''}pass --api-key or set MERGESERVE_API_KEY)")
    if status == 404:
        return {}  # no model listing on this server: unknown models show up as counted errors
    if status != 200:
        raise EndpointError(f"{url}/v1/models: HTTP {status} {_error_message(text)}")
    try:
        listed = {m["id"]: m for m in json.loads(text)["data"]}
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"{url}/v1/models: not an OpenAI model list: {text[:160]!r}") from None
    missing = [m for m in models if m not in listed]
    if missing:
        raise EndpointError(f"{url} does not serve {', '.join(map(repr, missing))} (it serves: {', '.join(sorted(listed)) or 'nothing'})")
    return listed
