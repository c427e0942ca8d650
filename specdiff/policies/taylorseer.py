"""TaylorSeer (Liu et al., 2025, "From Reusing to Forecasting").

Full steps: the first `warmup_steps`, then every `interval`-th step. At a
full step each block's residual (output - input, both streams) is stored with
finite-difference derivatives up to `order` (in units of steps); in between,
each block's residual is predicted by the Taylor expansion
    r(s) = sum_k d_k / k! * (s - s_full)^k.
Defaults: interval 6, order 1, first 3 steps full (the paper's FLUX N6 O1).
The paper works per module (attention, MLP); here per block, as for FORA.
"""

from __future__ import annotations

import dataclasses
import math

from specdiff.engine.policy import BlockCall, BlockResult, PolicyConfig, check_int
from specdiff.policies.block_cache import BlockLevelPolicy, add_residual, full_step, run_and_measure


@dataclasses.dataclass(frozen=True)
class TaylorSeerConfig(PolicyConfig):
    """TaylorSeer: between full steps, extrapolate each block's residual by a Taylor series in the step.

    Args:
        interval (int, default 6): steps between full steps (1 = full compute).
        order (int, default 1): Taylor order (0 = plain reuse, as FORA).
        warmup_steps (int, default 3): steps at the start that run in full.
    """

    method = "taylorseer"

    interval: int = 6
    order: int = 1
    warmup_steps: int = 3

    def validate(self) -> None:
        check_int(self, "interval", 1, 100)
        check_int(self, "order", 0, 3)
        check_int(self, "warmup_steps", 1)


class TaylorSeerPolicy(BlockLevelPolicy):
    config: TaylorSeerConfig

    def new_block_state(self) -> dict:
        return {}  # block index -> (step of its last full run, [residual, 1st difference, ...])

    def run_block(self, factors: dict, call: BlockCall) -> BlockResult:
        step, index = call.step, call.index
        if full_step(step, self.config.warmup_steps, self.config.interval) or index not in factors:
            result, residual = run_and_measure(call)
            previous = factors.get(index)
            derivatives = [residual]
            if previous is not None:
                last_step, last = previous
                gap = step - last_step
                for k in range(1, self.config.order + 1):
                    if k > len(last):
                        break
                    derivatives.append(tuple(
                        None if new is None or old is None else (new - old) / gap
                        for new, old in zip(derivatives[k - 1], last[k - 1])
                    ))
            factors[index] = (step, derivatives)
            return result
        anchor_step, derivatives = factors[index]
        distance = step - anchor_step
        image = sum(d[0] * distance**k / math.factorial(k) for k, d in enumerate(derivatives))
        text_delta = None
        if derivatives[0][1] is not None:
            text_delta = sum(d[1] * distance**k / math.factorial(k) for k, d in enumerate(derivatives))
        return add_residual(call, (image, text_delta))
