"""What a model adapter does: split a transformer into embed -> blocks -> head,
run it on the image tokens the engine picks, and swap its attention processors.

Install touches one instance: it sets an instance attribute `forward` (the
class is never changed) and replaces the attention processors; uninstall
deletes the attribute and puts the original processor objects back.
"""

from __future__ import annotations

import torch

from specdiff.engine.runtime import Runtime


def gather_tokens(tokens: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) -> (B, n, D) rows `active` (B, n); all rows when active is None."""
    if active is None:
        return tokens
    return tokens.gather(1, active.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def timestep_value(timestep: torch.Tensor | float) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item())
    return float(timestep)


def on_tokens(context, active: torch.Tensor | None, run):
    """Run `run()` with the attention context set to the image tokens `active` (None: as the step set it)."""
    if active is None:
        return run()
    previous = context.active
    context.active = active
    try:
        return run()
    finally:
        context.active = previous


class Adapter:
    """One per model family. Subclasses set `model_types` and implement the three hooks."""

    model_types: tuple[type, ...] = ()
    family = ""

    @classmethod
    def supports(cls, model) -> bool:
        return isinstance(model, cls.model_types)

    def __init__(self, model: torch.nn.Module, runtime: Runtime) -> None:
        self.model = model
        self.runtime = runtime
        self._original_processors = None

    def make_processor(self, layer_name: str, layer_index: int):
        raise NotImplementedError

    def accelerated_forward(self, *args, **kwargs):
        raise NotImplementedError

    def install(self) -> None:
        if "forward" in vars(self.model):
            raise RuntimeError(
                f"{type(self.model).__name__} already has an instance-level forward (another cache library?); "
                "remove it before enabling specdiff"
            )
        self._original_processors = dict(self.model.attn_processors)
        processors = {
            name: self.make_processor(name, index) for index, name in enumerate(self._original_processors)
        }
        self.model.set_attn_processor(processors)
        self.model.forward = self.accelerated_forward

    def uninstall(self) -> None:
        vars(self.model).pop("forward", None)
        if self._original_processors is not None:
            self.model.set_attn_processor(self._original_processors)
            self._original_processors = None
