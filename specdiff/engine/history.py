"""Per-token output history: what fills the tokens that a step does not compute.

The device work (`assemble`, `store`) and the host bookkeeping (`advance`) are separate: a step
replayed from a CUDA graph runs only the first, and the host runs the second after it. Outputs,
cached counts and observed changes live in persistent buffers written in place.
"""

from __future__ import annotations

import math

import torch

from specdiff.engine.buffers import BufferPool

HISTORY_LENGTH = 3


def approximation_weights(past_timesteps: list[float], current: float) -> list[float]:
    """SpecDiff's weights for the last three outputs (most recent first).

    W_i = e^{-i} (T_{t+i} - T_t) / sum_j e^{-j} (T_{t+j} - T_t): recent
    outputs count more, and each is weighted by how far its timestep lies
    from the current one. The weights are positive and sum to one.
    """
    raw = [math.exp(-(i + 1)) * abs(t - current) for i, t in enumerate(past_timesteps)]
    total = sum(raw)
    if total <= 0:
        return [1.0] + [0.0] * (len(raw) - 1)
    return [r / total for r in raw]


def inverse_gap(previous: float, current: float) -> float:
    """1 / the timestep distance between two outputs (at least 1e-6 apart)."""
    return 1.0 / max(abs(current - previous), 1e-6)


class TokenHistory:
    """The last outputs of every image token (B, N, P) and how long each token was cached."""

    def __init__(self, track_change: bool = False, buffers: BufferPool | None = None, name: tuple = ()) -> None:
        self.track_change = track_change  # observed_change costs a pass over the outputs: only when read
        self.buffers = buffers if buffers is not None else BufferPool()
        self.name = name  # prefix of this history's buffers in the pool
        self.count = 0  # outputs stored so far in this generation (host)
        self.timesteps: list[float] = []  # most recent first
        self._change_seen = False  # observed_change holds an observation of this generation

    # The buffers are looked up by name, never held from the last store: a step replayed from a CUDA
    # graph runs no Python, and the host must still find what the graph wrote.
    @property
    def _ring(self) -> torch.Tensor | None:
        """(HISTORY_LENGTH, B, N, P) outputs, most recent first."""
        return self.buffers.find(self.name + ("outputs",))

    @property
    def _cached(self) -> torch.Tensor | None:
        return self.buffers.find(self.name + ("cached",))

    @property
    def _change(self) -> torch.Tensor | None:
        return self.buffers.find(self.name + ("change",))

    def __len__(self) -> int:
        return min(self.count, HISTORY_LENGTH)

    @property
    def outputs(self) -> list[torch.Tensor]:
        """The stored outputs, most recent first (views of the persistent ring)."""
        return [] if self._ring is None else [self._ring[i] for i in range(len(self))]

    @property
    def shape(self) -> torch.Size | None:
        return None if self.count == 0 or self._ring is None else self._ring.shape[1:]

    @property
    def cached_count(self) -> torch.Tensor | None:
        """(B, N) consecutive steps each token was not computed."""
        return self._cached if self.count else None

    @property
    def observed_change(self) -> torch.Tensor | None:
        """(B, N) how fast each token's output moved (norm per unit of timestep) when it last ran."""
        return self._change if self._change_seen else None

    def assemble(self, computed: torch.Tensor, active: torch.Tensor | None, reuse: torch.Tensor | None,
                 weights: torch.Tensor | None) -> torch.Tensor:
        """Full (B, N, P) output: computed tokens from the network, the rest from history.

        reuse (B, N) bool marks tokens that copy their last output (C2); other non-computed tokens (C3)
        get the average of their last three outputs with `weights` (a (3,) tensor, see
        approximation_weights), or their last output while fewer than three exist.
        """
        if active is None:
            return computed
        last = self._ring[0]
        if reuse is not None and len(self) >= HISTORY_LENGTH:
            approx = (weights.view(-1, 1, 1, 1) * self._ring).sum(0)
            filled = torch.where(reuse.unsqueeze(-1), last, approx.to(last.dtype))
        else:
            filled = last.clone()
        index = active.unsqueeze(-1).expand(-1, -1, computed.shape[-1])
        return filled.scatter_(1, index, computed)

    def store(self, output: torch.Tensor, active: torch.Tensor | None, inverse_gap: torch.Tensor | None) -> None:
        """Device work of recording a step's output (no host state changes: see advance).
        inverse_gap: 1 / the timestep distance to the previous output (read when tracking change)."""
        batch, tokens = output.shape[:2]
        ring = self.buffers.get(self.name + ("outputs",), (HISTORY_LENGTH, *output.shape), output.dtype, output.device)
        if self.track_change and self.count:
            change = (output - ring[0]).float().norm(dim=-1) * inverse_gap
            observed = self.buffers.get(self.name + ("change",), change.shape, change.dtype, change.device)
            if active is None or not self._change_seen:
                observed.copy_(change)
            else:  # only computed tokens were observed; the others keep their last observation
                observed.scatter_(1, active, change.gather(1, active))
        for older in range(min(self.count, HISTORY_LENGTH - 1), 0, -1):  # shift: the oldest falls out
            ring[older].copy_(ring[older - 1])
        ring[0].copy_(output)
        cached = self.buffers.get(self.name + ("cached",), (batch, tokens), torch.int32, output.device)
        if active is None or not self.count:
            cached.zero_()
        else:
            cached.add_(1).scatter_(1, active, 0)

    def advance(self, timestep: float) -> None:
        """Host bookkeeping after store."""
        if self.track_change and self.count:
            self._change_seen = True
        self.count += 1
        self.timesteps.insert(0, timestep)
        del self.timesteps[HISTORY_LENGTH:]

    def record(self, output: torch.Tensor, active: torch.Tensor | None, timestep: float) -> None:
        """store + advance, with the timestep distance from the host (outside a step)."""
        gap = None
        if self.count:
            gap = torch.tensor(inverse_gap(self.timesteps[0], timestep), device=output.device)
        self.store(output, active, gap)
        self.advance(timestep)
