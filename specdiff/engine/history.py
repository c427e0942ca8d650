"""Per-token output history: what fills the tokens that a step does not compute."""

from __future__ import annotations

import math

import torch

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


class TokenHistory:
    """The last outputs of every image token (B, N, P) and how long each token was cached."""

    def __init__(self, track_change: bool = False) -> None:
        self.track_change = track_change  # observed_change costs a pass over the outputs: only when read
        self.outputs: list[torch.Tensor] = []  # most recent first
        self.timesteps: list[float] = []
        self.cached_count: torch.Tensor | None = None  # (B, N) consecutive steps not computed
        # (B, N) how fast each token's output moved (norm per unit of timestep) when it was last computed
        self.observed_change: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.outputs)

    def assemble(
        self,
        computed: torch.Tensor,
        active: torch.Tensor | None,
        reuse: torch.Tensor | None,
        timestep: float,
    ) -> torch.Tensor:
        """Full (B, N, P) output: computed tokens from the network, the rest from history.

        reuse (B, N) bool marks tokens that copy their last output (C2);
        other non-computed tokens (C3) get the weighted average of their last
        three outputs, or their last output while fewer than three exist.
        """
        if active is None:
            return computed
        last = self.outputs[0]
        if reuse is not None and len(self.outputs) >= HISTORY_LENGTH:
            weights = approximation_weights(self.timesteps[:HISTORY_LENGTH], timestep)
            approx = sum(w * o for w, o in zip(weights, self.outputs[:HISTORY_LENGTH]))
            filled = torch.where(reuse.unsqueeze(-1), last, approx.to(last.dtype))
        else:
            filled = last.clone()
        index = active.unsqueeze(-1).expand(-1, -1, computed.shape[-1])
        return filled.scatter(1, index, computed)

    def record(self, output: torch.Tensor, active: torch.Tensor | None, timestep: float) -> None:
        if self.track_change and self.outputs and self.outputs[0].shape == output.shape:
            gap = max(abs(timestep - self.timesteps[0]), 1e-6)
            change = (output - self.outputs[0]).float().norm(dim=-1) / gap
            if active is None or self.observed_change is None:
                self.observed_change = change
            else:  # only computed tokens were observed; the others keep their last observation
                self.observed_change = self.observed_change.scatter(1, active, change.gather(1, active))
        self.outputs.insert(0, output)
        del self.outputs[HISTORY_LENGTH:]
        self.timesteps.insert(0, timestep)
        del self.timesteps[HISTORY_LENGTH:]
        batch, tokens = output.shape[:2]
        if active is None or self.cached_count is None:
            self.cached_count = torch.zeros(batch, tokens, dtype=torch.int32, device=output.device)
        else:
            computed = torch.zeros_like(self.cached_count, dtype=torch.bool).scatter(1, active, True)
            self.cached_count = torch.where(computed, 0, self.cached_count + 1)
