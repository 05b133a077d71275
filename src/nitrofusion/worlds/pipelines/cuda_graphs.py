"""Replay a function's GPU work from a CUDA graph, one graph per input signature.

At batch 1 a one-step SDXL image is a few thousand small kernels, and the GPU waits for the host to launch them
(measured on an H100: the UNet took about as long at 512 px as at 1024 px). A CUDA graph records the launches
once and replays them in one call. Rules that make this safe, all kept by `GraphedCall`:
- every input is a tensor copied into a static buffer before each replay (shapes, dtypes, devices fixed per graph:
  a new signature captures a new graph);
- the output tensors are the graph's static buffers: the next replay overwrites them, and graphs that share a
  memory pool may reuse each other's freed intermediates, so a caller uses or clones an output before the next
  replay of ANY graph of that pool (the runtime does: the scheduler consumes the UNet's, the 8-bit conversion the
  decoder's, and prompt embeddings are cloned into their cache);
- the function warms up on a side stream before capture (cuDNN's algorithm search, torch.compile's compilation
  and lazy allocations must not happen inside the capture);
- a capture that fails (an op that synchronises with the host, a CPU fallback) says so in one line and that
  signature runs without a graph from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...errors import describe

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
# capture(fn, static_inputs) -> (replay, static_outputs): records fn's work on the static inputs once
Capture = Callable[[Callable[..., Outputs], Sequence[torch.Tensor]], tuple[Callable[[], None], Outputs]]

WARMUP_CALLS = 2  # the first call searches cuDNN algorithms / compiles; the second runs as a replay will


def cuda_capture(pool=None, warmup: int = WARMUP_CALLS) -> Capture:
    """The real capture: warm-up on a side stream, then torch.cuda.graph; graphs sharing `pool` (one runtime's
    graphs, replayed one after another, never concurrently) share their memory."""

    def capture(fn, static_inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn(*static_inputs)
        return graph.replay, outputs

    return capture


def _signature(args: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device, a.stride()) for a in args)


class GraphedCall:
    """fn(*tensors) -> tensor(s), replayed from a graph per input signature; see the module's rules."""

    def __init__(self, fn: Callable[..., Outputs], name: str, capture: Capture,
                 log: Callable[[str], None] = print):
        self.fn, self.name, self.capture, self.log = fn, name, capture, log
        self.graphs: dict[tuple, tuple[list[torch.Tensor], Callable[[], None], Outputs]] = {}
        self.failed: set[tuple] = set()

    def __call__(self, *args: torch.Tensor) -> Outputs:
        key = _signature(args)
        entry = self.graphs.get(key)
        if entry is None:
            if key in self.failed:
                return self.fn(*args)
            entry = self._record(key, args)
            if entry is None:
                return self.fn(*args)
        static_inputs, replay, outputs = entry
        for buffer, arg in zip(static_inputs, args, strict=True):
            buffer.copy_(arg)
        replay()
        return outputs

    def _record(self, key: tuple, args: Sequence[torch.Tensor]):
        static_inputs = [a.clone(memory_format=torch.preserve_format) for a in args]
        try:
            replay, outputs = self.capture(self.fn, static_inputs)
        except Exception as e:  # noqa: BLE001 - any failure to record means "run this one without a graph"
            self.failed.add(key)
            shapes = ", ".join("x".join(map(str, a.shape)) for a in args)
            self.log(f"CUDA graph: {self.name} at {shapes} runs without a graph ({describe(e)})")
            return None
        self.graphs[key] = static_inputs, replay, outputs
        return self.graphs[key]
