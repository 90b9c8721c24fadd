"""The first streamed chunk is not held back by Ray's stream batching; the rest is still batched.

Uses Ray's real ``Batcher`` on a real asyncio generator (no engine needed: the batching is
independent of what the items are).
"""

from __future__ import annotations

import asyncio
import time

from ray.llm._internal.serve.utils.batcher import Batcher

from mergeserve.serve.llm_server import LLMServer, first_then_batched

GAP_S = 0.01  # the engine's time per token in this test
INTERVAL_MS = 400.0  # far longer than GAP_S, so that holding the first chunk would show
N = 60  # tokens per stream: N * GAP_S is longer than the interval


async def tokens(n: int):
    for i in range(n):
        await asyncio.sleep(GAP_S)
        yield i


async def first_arrival_and_batches(make_stream) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    stream = make_stream()  # inside the event loop: Ray's Batcher starts a task when made
    first = await stream.__anext__()
    first_s = time.perf_counter() - t0
    return first_s, [first, *[b async for b in stream]]


def test_first_chunk_is_sent_at_once_and_the_rest_batched():
    first_s, batches = asyncio.run(first_arrival_and_batches(lambda: first_then_batched(tokens(N), INTERVAL_MS)))
    assert batches[0] == [0]
    assert first_s < INTERVAL_MS / 1000 / 2  # one token's time, not the batching interval
    assert [i for b in batches for i in b] == list(range(N))  # nothing lost, order kept
    assert len(batches) < N / 2  # the later tokens did travel in batches


def test_rays_batcher_alone_holds_the_first_chunk_for_the_interval():
    """The behaviour the subclass exists to change (if Ray changes it, this test says so)."""
    first_s, batches = asyncio.run(first_arrival_and_batches(lambda: Batcher(tokens(N), interval_ms=INTERVAL_MS).stream()))
    assert first_s >= 0.9 * INTERVAL_MS / 1000
    assert [i for b in batches for i in b] == list(range(N))


def test_empty_stream_yields_nothing():
    async def nothing():
        return
        yield  # noqa: B901 - makes this an async generator

    async def collect():
        return [b async for b in first_then_batched(nothing(), INTERVAL_MS)]

    assert asyncio.run(collect()) == []


def test_server_class_keeps_rays_name_and_uses_the_first_chunk_batcher():
    from ray.llm._internal.serve.core.server.llm_server import LLMServer as RayLLMServer

    assert issubclass(LLMServer, RayLLMServer) and LLMServer.__name__ == "LLMServer"
    assert LLMServer._batch_output_stream is not RayLLMServer._batch_output_stream
