"""Persistent tensors for a step's state: the same storage for the same (name, shape, dtype, device).

A step's state (token history, attention taps, speculative maps, per-step scalars) lives in these
buffers and is written in place, so every step reads and writes the same addresses: what CUDA graph
replay needs, and no allocation per step otherwise.
"""

from __future__ import annotations

import torch


class BufferPool:
    """Named persistent tensors. `get` returns the tensor kept under `name` when its shape, dtype and
    device match, else a new (uninitialised) one that replaces it."""

    def __init__(self) -> None:
        self._tensors: dict[tuple, torch.Tensor] = {}
        self.allocations = 0  # tensors allocated so far: a change means some address changed

    def get(self, name: tuple, shape, dtype: torch.dtype, device) -> torch.Tensor:
        shape = torch.Size(shape)
        tensor = self._tensors.get(name)
        if tensor is None or tensor.shape != shape or tensor.dtype != dtype or tensor.device != torch.device(device):
            tensor = torch.empty(shape, dtype=dtype, device=device)
            self._tensors[name] = tensor
            self.allocations += 1
        return tensor

    def find(self, name: tuple) -> torch.Tensor | None:
        """The tensor kept under `name`, if any (nothing allocated)."""
        return self._tensors.get(name)

    def clear(self) -> None:
        self._tensors.clear()
        self.allocations += 1

    def __len__(self) -> int:
        return len(self._tensors)

    def addresses(self) -> dict[tuple, int]:
        """name -> data pointer (tests: the same storage across steps and generations)."""
        return {name: t.data_ptr() for name, t in self._tensors.items()}


def write_host_values(buffer: torch.Tensor, values) -> None:
    """Copy host values into a device buffer without a host sync: on CUDA from pinned memory,
    asynchronously (the pinned block is kept until the copy has run)."""
    source = torch.as_tensor(values, dtype=buffer.dtype).reshape(buffer.shape)
    if buffer.device.type == "cuda":
        buffer.copy_(source.pin_memory(), non_blocking=True)
    else:
        buffer.copy_(source)
