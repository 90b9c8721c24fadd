"""A small OpenAI-compatible streaming server that misbehaves in known ways, for testing the load
tester against figures the server itself records.

It is a stand-in on purpose: a real vLLM server cannot be told to fail every 5th request or drop a
stream half-way. It speaks plain HTTP/1.1 (keep-alive, chunked SSE streams) on 127.0.0.1, in a
thread of the test process, so its timestamps share the test's ``time.perf_counter`` clock.

Behaviour (all counters over ``/v1/completions`` and ``/v1/chat/completions`` requests):

- a bearer token is required (401 otherwise); models not listed get 404;
- model ``ghost`` is listed in ``/v1/models`` but every request for it gets 404 (a model that
  went away after the pre-flight check); model ``hang`` accepts and never answers;
- every ``fail_every``-th request gets a 500 before any output;
- every ``drop_every``-th request (of those not failed) closes the connection after
  ``drop_after`` content chunks, without ending the stream;
- otherwise: an empty role chunk at once (chat) or an empty-text chunk (completions), then
  ``max_tokens`` tokens, ``tokens_per_chunk`` per chunk, the first after ``ttft`` s and the rest
  ``itl`` s apart, then a usage chunk (prompt tokens = words of the prompt) and ``[DONE]``; the
  chunked body's end follows 20 ms later.

Every request is recorded (``server.log``): model, outcome, tokens sent, and the time it was
received and its first content chunk written.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Behaviour:
    api_key: str = "fake-key"
    models: tuple[str, ...] = ("alpha", "beta", "ghost", "hang")
    ttft: float = 0.2
    itl: float = 0.01
    tokens_per_chunk: int = 1
    fail_every: int = 0
    drop_every: int = 0
    drop_after: int = 2


@dataclass
class Served:
    model: str
    outcome: str  # ok, http_500, stream_dropped, http_401, http_404, hang
    received: float
    first_content: float | None = None
    tokens: int = 0
    prompt: str = ""


@dataclass
class FakeOpenAIServer:
    behaviour: Behaviour = field(default_factory=Behaviour)
    log: list[Served] = field(default_factory=list)

    def __post_init__(self):
        self.port = 0
        self.connections = 0  # TCP connections accepted
        self._count = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self._loop and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._shutdown.set)
            self._thread.join(10)

    def outcomes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.log:
            out[s.outcome] = out.get(s.outcome, 0) + 1
        return out

    # -- the server ---------------------------------------------------------------------------

    def _serve(self):
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._main())

    async def _main(self):
        self._shutdown = asyncio.Event()
        server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._writers: set = set()
        self._ready.set()
        await self._shutdown.wait()
        server.close()
        for w in list(self._writers):
            w.close()
        await asyncio.sleep(0.05)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                hdrs = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(hdrs.get("content-length", 0) or 0))
                keep = await self._handle(method, path, hdrs, body, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _json(self, writer, status: int, obj) -> bool:
        data = json.dumps(obj).encode()
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        return True

    async def _handle(self, method, path, hdrs, body, writer) -> bool:
        b = self.behaviour
        authorized = hdrs.get("authorization") == f"Bearer {b.api_key}"
        if path == "/v1/models":
            if not authorized:
                return await self._json(writer, 401, {"error": {"message": "bad key", "code": "invalid_api_key"}})
            return await self._json(writer, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in b.models]})
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return await self._json(writer, 404, {"error": {"message": f"no route {path}"}})
        req = json.loads(body)
        chat = path.endswith("chat/completions")
        prompt = req["messages"][-1]["content"] if chat else req["prompt"]
        rec = Served(req.get("model"), "ok", time.perf_counter(), prompt=prompt)
        self.log.append(rec)
        if not authorized:
            rec.outcome = "http_401"
            return await self._json(writer, 401, {"error": {"message": "bad key", "code": "invalid_api_key"}})
        if rec.model not in b.models or rec.model == "ghost":
            rec.outcome = "http_404"
            return await self._json(writer, 404, {"error": {"message": f"The model `{rec.model}` does not exist."}})
        if rec.model == "hang":
            rec.outcome = "hang"
            await self._shutdown.wait()
            return False
        self._count += 1
        if b.fail_every and self._count % b.fail_every == 0:
            rec.outcome = "http_500"
            return await self._json(writer, 500, {"error": {"message": "engine failed"}})
        drop = bool(b.drop_every) and self._count % b.drop_every == 0
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")

        async def event(obj) -> None:
            data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

        def choice(text):
            return {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}

        await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}} if chat else choice("")]})
        n, sent = int(req["max_tokens"]), 0
        await asyncio.sleep(b.ttft)
        while sent < n:
            k = min(b.tokens_per_chunk, n - sent)
            if rec.first_content is None:
                rec.first_content = time.perf_counter()  # stamped before the write: the client cannot see it earlier
            await event({"choices": [choice("tok " * k)]})
            sent += k
            rec.tokens = sent
            if drop and sent >= b.drop_after * b.tokens_per_chunk:
                rec.outcome = "stream_dropped"
                writer.transport.abort()  # no terminating chunk: the client sees an incomplete body
                return False
            if sent < n:
                await asyncio.sleep(b.itl)
        await event({"choices": [], "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                                               "total_tokens": len(prompt.split()) + n}})
        await event("[DONE]")
        await asyncio.sleep(0.02)  # the body's end comes in a later segment, as it may from a real server
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
