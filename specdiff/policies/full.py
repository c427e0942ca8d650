"""Full compute (the paper's "RFlow" baseline): every token, every step."""

from __future__ import annotations

import dataclasses

from specdiff.engine.policy import Policy, PolicyConfig


@dataclasses.dataclass(frozen=True)
class FullComputeConfig(PolicyConfig):
    """No field: every step runs every token. For fewer steps, pass fewer
    num_inference_steps to the pipeline."""

    method = "full"


class FullComputePolicy(Policy):
    """Every step dense (Policy.dense_step's default)."""
