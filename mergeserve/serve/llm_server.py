"""Ray's ``LLMServer`` with one change to how a stream's chunks are batched: the first chunk goes
out at once.

Ray Serve LLM batches a stream's chunks (``stream_batching_interval_ms``, 50 ms by default) so
that each hop (LLM replica -> ingress replica -> HTTP proxy) carries several tokens per message
instead of one: on a small CPU that per-message cost is what limits tokens/s. But Ray's
``Batcher`` also holds the *first* chunk until the first interval has passed, which adds up to
the whole interval to every request's time to first token. Here the first chunk is sent as soon
as the engine produces it; the rest of the stream is batched as before. Everything else (the
OpenAI layer, errors, usage) is Ray's and vLLM's, unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TypeVar

from ray.serve.llm.deployment import LLMServer as RayLLMServer

from mergeserve.serve.ray_llm_adapter import Batcher

T = TypeVar("T")


async def first_then_batched(generator: AsyncGenerator[T, None], interval_ms: float | None) -> AsyncGenerator[list[T], None]:
    """Yield ``[first item]`` as soon as it exists, then Ray's interval batches of the rest."""
    try:
        first = await generator.__anext__()
    except StopAsyncIteration:
        return
    yield [first]
    async for batch in Batcher(generator, interval_ms=interval_ms).stream():
        yield batch


class LLMServer(RayLLMServer):
    """``ray.serve.llm``'s LLMServer (same name, so Serve's deployment and metric names stay
    ``LLMServer:<model>``), streaming its first chunk without the batching delay."""

    def _batch_output_stream(self, generator: AsyncGenerator[T, None]) -> AsyncGenerator[list[T], None]:
        return first_then_batched(generator, self._get_batch_interval_ms())
