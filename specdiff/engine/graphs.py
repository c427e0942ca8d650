"""CUDA-graph replay of transformer calls, one graph per kind of step.

A call's kernels depend only on its PreparedStep (dense or sparse, taps, history depth, ...) and its
inputs' shapes; every tensor it reads or keeps lives at a fixed address (static inputs here, the
engine's persistent buffers). So each kind of step is captured once and replayed: the host issues one
graph launch instead of thousands of kernels, and stays off the critical path.

The first call of a kind runs eagerly on the static inputs (it warms up kernels and allocates the
engine's buffers), the second is captured and replayed, later ones are replayed. With capture off
(`capture=False`, used on a CPU) the same static inputs and kinds are used and every call runs eagerly:
the graph path's logic, checkable without a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable

import torch

from specdiff.engine.buffers import BufferPool


@dataclasses.dataclass
class _Variant:
    inputs: dict[str, torch.Tensor]
    graph: object = None  # torch.cuda.CUDAGraph once captured
    output: torch.Tensor | None = None
    calls: int = 0


class StepGraphs:
    """The captured graphs of one accelerated transformer, by key."""

    def __init__(self, capture: bool, buffers: BufferPool, addresses: Callable[[], Hashable]) -> None:
        self.capture = capture
        self.buffers = buffers  # the engine's persistent buffers, which the graphs read and write
        self.addresses = addresses  # their data pointers (and any other persistent tensor's)
        self._allocations = -1
        self._addresses = None
        self.variants: dict[Hashable, _Variant] = {}
        self._pool = None  # one memory pool shared by every graph (they never run concurrently)
        self.captures = 0
        self.replays = 0

    capture_runs = False  # a CUDA capture records kernels without running them: replay once after it

    @property
    def device_type(self) -> str | None:
        """The device the model must be on (None: any)."""
        return "cuda" if self.capture else None

    def _capture(self, step: Callable[[dict], torch.Tensor], inputs: dict[str, torch.Tensor]):
        """(graph, its output): step's kernels recorded into a CUDA graph sharing this object's pool."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = step(inputs)
        self._pool = graph.pool()
        return graph, output

    def clear(self) -> None:
        """Drop every graph and static input (their memory goes back to the allocator)."""
        self.variants.clear()
        self._pool = None
        self._addresses = None

    def _check_addresses(self, keep: Hashable = None) -> None:
        """A graph reads its buffers at the addresses they had when it was captured: when any moved
        (a new shape, buffers released), drop every other graph (they are captured again)."""
        self._allocations = self.buffers.allocations
        addresses = self.addresses()
        if addresses != self._addresses:
            if self._addresses is not None:
                self.variants = {k: v for k, v in self.variants.items() if k == keep}
            self._addresses = addresses

    def run(self, key: Hashable, inputs: dict[str, torch.Tensor], step: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        """step(static inputs) -> output, for the kind `key`, from its graph when there is one. Returns a
        tensor the caller owns (the graph's output is copied out: the next replay overwrites it)."""
        if self.capture and self.buffers.allocations != self._allocations:
            self._check_addresses()  # the host parts allocated a buffer
        variant = self.variants.get(key)
        if variant is None:
            variant = self.variants[key] = _Variant({name: t.clone() for name, t in inputs.items()})
        else:
            for name, tensor in inputs.items():
                variant.inputs[name].copy_(tensor)
        variant.calls += 1
        if not self.capture or variant.calls == 1:  # eager (first call of a kind: warm-up)
            output = step(variant.inputs)
            if self.capture:
                self._check_addresses(keep=key)  # it may have allocated buffers
            return output
        if variant.graph is None:
            variant.graph, variant.output = self._capture(step, variant.inputs)
            self.captures += 1
            self._check_addresses(keep=key)
            if not self.capture_runs:
                variant.graph.replay()
        else:
            variant.graph.replay()
        self.replays += 1
        return variant.output.clone()
