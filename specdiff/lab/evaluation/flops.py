"""FLOPs of a call, counted by torch.utils.flop_counter.FlopCounterMode.

On the CPU, PyTorch's counter has no entry for the fused attention kernel
(aten._scaled_dot_product_flash_attention_for_cpu) and would leave attention
out; it is registered here with PyTorch's own SDPA formula.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_mapping() -> dict:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_flash_attention_flops
    return mapping


def count_flops(fn: Callable[[], object]) -> int:
    """Run fn() once and return the FLOPs it executed."""
    counter = FlopCounterMode(display=False, custom_mapping=_extra_mapping())
    with counter:
        fn()
    return int(counter.get_total_flops())


def count_module_flops(fn: Callable[[], object], module: torch.nn.Module) -> int:
    """FLOPs executed inside `module` (e.g. a pipeline's transformer) during fn()."""
    counter = FlopCounterMode(display=False, custom_mapping=_extra_mapping())
    with counter:
        fn()
    flops = counter.get_flop_counts()
    name = type(module).__name__
    for key, per_op in flops.items():
        if key == name or key.endswith("." + name):
            return int(sum(per_op.values()))
    return 0
