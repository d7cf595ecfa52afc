"""The GPU decode step as one CUDA graph: a token through every layer in one launch, where the eager path makes
a few thousand kernel launches from Python (about 70 a layer).

The position is held on the device (sagekit.model.llama's module docstring), so one graph replays at every
position. A model gets one when every linear of its layers runs on a kernel of sagekit's own at one token
(`capturable`: the packed kernels and the FP16 GEMV), since CuPy refuses cuBLAS calls during a capture. It is
captured at the first step, and again when the cache or RoPE tables it points into are reallocated
(RunState.reserve). Its temporaries come from a memory pool of its own: once freed after the capture they stay
the graph's, so no array made outside it can land in memory a launch writes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from sagekit.kernels import held_position


class DecodeGraph:
    """Callable as DecodePlan is: the residual stream (1, dim) after every layer for one token at `start`."""

    def __init__(self, layers: list[Any], block: Callable[[int, Any, Any], Any], backend: Any):
        self.layers, self.block, self.xp = list(layers), block, backend.xp
        self.linears = _linears(layers)
        self.graph, self.key = None, None

    def fits(self, layers: list[Any]) -> bool:
        """Whether the layers still hold the linears captured (swapped ones need the eager path)."""
        now = _linears(layers)
        return len(now) == len(self.linears) and all(a is b for a, b in zip(self.linears, now))

    def __call__(self, h: Any, state: Any, start: int) -> Any:
        if not held_position.takes(state.max_seq_len, state.config.head_dim):
            for i in range(len(self.layers)):  # a cache or heads the attention kernel cannot take: the eager step
                h = self.block(i, h, start)
            return h
        key = tuple(a.data.ptr for a in (state.cache_k, state.cache_v, state.cos, state.sin)) + (h.shape,)
        if key != self.key:
            self._capture(h, start, key)
        self.h[...] = h
        self.pos.fill(start)
        self.graph.launch()
        return self.out.copy()

    def _run(self) -> None:
        h = self.h
        for i in range(len(self.layers)):
            h = self.block(i, h, self.pos)
        self.out[...] = h

    def _capture(self, h: Any, start: int, key: tuple) -> None:
        """Run the step eagerly (compiling kernels, making cached tables outside the graph's pool), then on a
        stream and pool of its own (filling the pool, so the capture allocates nothing new), then capture it. Each
        run writes this position's keys and values, as the launch after the capture will again."""
        xp = self.xp
        xp.cuda.get_current_stream().synchronize()  # an earlier graph may still run: done before its pool goes
        self.graph, self.pool, stream = None, xp.cuda.MemoryPool(), xp.cuda.Stream(non_blocking=True)
        self.h, self.pos = xp.array(h, dtype=xp.float32), xp.full(1, start, dtype=xp.int32)
        self.out = xp.empty_like(self.h)
        self._run()
        xp.cuda.get_current_stream().synchronize()
        with xp.cuda.using_allocator(self.pool.malloc), stream:
            self._run()
            stream.begin_capture()
            try:
                self._run()
            except Exception:
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise
            graph = stream.end_capture()
        stream.synchronize()
        self.graph, self.key = graph, key


def graph(layers: list[Any], block: Callable[[int, Any, Any], Any], backend: Any) -> DecodeGraph | None:
    """A DecodeGraph for a GPU model whose linears can all be captured (module docstring), else None."""
    lins = _linears(layers)
    if not backend.is_gpu or not lins or not all(getattr(lin, "capturable", False) for lin in lins):
        return None
    return DecodeGraph(layers, block, backend)


def _linears(layers: list[Any]) -> list[Any]:
    return [lin for L in layers for lin in L.linears().values()]
