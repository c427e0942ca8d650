"""Token-wise helpers shared by the engine, the adapters and token-level policies."""

from __future__ import annotations

import torch


def gather_tokens(tokens: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) -> (B, n, D) rows `active` (B, n); all rows when active is None."""
    if active is None:
        return tokens
    return tokens.gather(1, active.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
