"""CUDA-graph semantics on a CPU, for tests: a capture records the step's operators (running them once,
as capture + the first replay would), a replay runs the recorded operators again on the same tensors
and writes their results into the tensors the capture produced, with no Python of the step.

So a step that depends on host state set by Python inside the step, or that reads a tensor the host
replaced, gives a different result than the plain path, as it would on a GPU; and an operator that
needs a host sync inside a captured step fails, as CUDA capture does.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from specdiff.engine.graphs import StepGraphs

aten = torch.ops.aten
# operators that read a device value on the host (or size their output from one): a sync on a GPU
SYNC_OPERATORS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten.is_nonzero,
                  aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.repeat_interleave}


class HostSync(RuntimeError):
    pass


class SyncCounter(TorchDispatchMode):
    """Counts host-syncing operators (and all operators that are not views)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.operators = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNC_OPERATORS:
            self.syncs.append(str(func))
        if not func.is_view:
            self.operators += 1
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.operators = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in SYNC_OPERATORS:
            raise HostSync(f"{func} reads a device value on the host inside a captured step")
        output = func(*args, **kwargs)
        if not func.is_view:  # a view shares its base's storage: it follows the replayed base
            flat = tree_flatten(output)[0]
            self.operators.append((func, args, kwargs, [t if isinstance(t, torch.Tensor) else None for t in flat]))
        return output


class RecordedGraph:
    def __init__(self, operators) -> None:
        self.operators = operators

    def replay(self) -> None:
        for func, args, kwargs, outputs in self.operators:
            fresh = tree_flatten(func(*args, **kwargs))[0]
            for recorded, value in zip(outputs, fresh):
                if recorded is not None and value is not recorded:
                    recorded.copy_(value)


class EmulatedGraphs(StepGraphs):
    capture_runs = True  # recording runs the step once: no replay right after it
    device_type = None  # any device

    def _capture(self, step, inputs):
        recorder = _Recorder()
        with recorder:
            output = step(inputs)
        return RecordedGraph(recorder.operators), output


def emulate_graphs(obj) -> EmulatedGraphs:
    """Replace the graphs of an object enabled with cuda_graphs='eager' by emulated CUDA graphs."""
    from specdiff.integration import _state_of

    adapter = _state_of(obj).adapter
    runtime = adapter.runtime
    adapter.graphs = EmulatedGraphs(True, runtime.buffers, runtime.buffer_addresses)
    return adapter.graphs
