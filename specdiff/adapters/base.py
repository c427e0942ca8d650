"""What a model adapter does: wire the engine into a stock transformer without replacing its forward.

The stock forward (with its decorators, e.g. diffusers' LoRA scale, and any
hooks other libraries put around it, e.g. accelerate's offloading) stays in
charge. specdiff adds, on the one instance:

- a forward pre-hook on the transformer: reads the timestep and refuses
  arguments the engine cannot honour;
- a forward hook on the family's embedding module: the engine plans the step
  (`begin_step`) and the hook returns only the image tokens that run;
- a forward hook on the family's output projection: the engine fills in the
  tokens that did not run (`end_step`) and the stock code un-patchifies the
  full grid;
- where a family applies positions inside attention (FLUX's RoPE), a forward
  hook on its position module: the rows of the tokens that run, once per step;
- its attention processors (keys/values of all image tokens from the cache);
- for block-level policies only, a diffusers `ModelHook` per block, so a
  policy can stand in for a block;
- with CUDA graphs, a diffusers `ModelHook` on the transformer that replays
  each kind of real-pass call from its graph (engine/graphs.py).

`uninstall` removes exactly these, whatever else was added or removed since.
A family declares its pieces: the module names, its block lists, how its
pipelines lay out classifier-free guidance, and its processor.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading

import torch

from specdiff.engine.attention import AttentionContext, LayerKV
from specdiff.engine.graphs import StepGraphs
from specdiff.engine.runtime import Runtime
from specdiff.engine.tokens import gather_tokens

_BLOCK_HOOK = "specdiff_block"
_GRAPH_HOOK = "specdiff_step_graphs"
BLOCK_COMPILATION_ATTR = "_specdiff_block_compilation"  # on the transformer, set by specdiff.compile_blocks


@dataclasses.dataclass
class BlockCompilation:
    """How a transformer's blocks were compiled, for block-level policies that call a block's forward
    themselves: the torch.compile options, and per block class its compiled forward."""

    options: dict
    forwards: dict = dataclasses.field(default_factory=dict)


def timestep_value(timestep: torch.Tensor | float) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item())
    return float(timestep)


class ScheduleReader:
    """The timestep of the transformer call in progress, from the pipeline's scheduler: its timesteps
    are copied to the host once per pipeline call (one sync), then indexed by the scheduler's step
    index, instead of a host-device sync (`.item()`) on every call. The first call of each schedule is
    checked against the timestep the transformer really got; a schedule that does not match (a custom
    loop, another scheduler) falls back to reading every call."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline  # its scheduler is read at every call: the user may swap it
        self.reset()

    def reset(self) -> None:
        """Forget the schedule: the next call reads and checks it again (called per pipeline call)."""
        self._tensor = None
        self._values: list[float] = []
        self._trusted = False

    @property
    def scheduler(self):
        return getattr(self.pipeline, "scheduler", None)

    def read(self, timestep, convert) -> float:
        """`convert`: the transformer's timestep argument (a float) -> the scheduler's units."""
        schedule = getattr(self.scheduler, "timesteps", None)
        if not isinstance(schedule, torch.Tensor) or schedule.ndim != 1:
            return convert(timestep_value(timestep))
        if schedule is not self._tensor:  # set_timesteps made a new schedule: a new pipeline call
            self._tensor, self._values = schedule, schedule.float().cpu().tolist()
            exact = convert(timestep_value(timestep))
            value = self._at_current_index()
            self._trusted = value is not None and abs(value - exact) <= 1e-2 * max(1.0, abs(exact))
            return exact
        value = self._at_current_index() if self._trusted else None
        return value if value is not None else convert(timestep_value(timestep))

    def _at_current_index(self) -> float | None:
        index = getattr(self.scheduler, "step_index", None)
        if index is None:
            index = getattr(self.scheduler, "begin_index", None) or 0
        return self._values[index] if isinstance(index, int) and 0 <= index < len(self._values) else None


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


class _ModelHook:
    """What diffusers' HookRegistry needs of a hook (duck-typed); subclasses define new_forward."""

    _is_stateful = False

    def __init__(self) -> None:
        self.fn_ref = None
        self.signature = None

    def initialize_hook(self, module):
        self.signature = inspect.signature(module.forward)
        return module

    def deinitalize_hook(self, module):  # diffusers' spelling
        return module

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output


class _BlockHook(_ModelHook):
    """A diffusers ModelHook that lets a block-level policy run, reuse or extrapolate one transformer block."""

    def __init__(self, adapter: "Adapter", index: int, count: int) -> None:
        super().__init__()
        self.adapter, self.index, self.count = adapter, index, count

    # Never traced, nor anything it calls: which blocks run is Python control flow over per-step state,
    # and traced it would recompile until dynamo's limit and then fall back to eager for every block.
    # Under regional compilation the block's own forward runs compiled (Adapter.compiled_block_forward).
    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        runtime = self.adapter.runtime
        arguments = self.signature.bind(*args, **kwargs).arguments
        tokens, text, arguments, rejoin = self.adapter.block_streams(module, arguments)
        original = self.fn_ref.original_forward
        compiled = self.adapter.compiled_block_forward(module, original)
        if compiled is not None:
            original = functools.partial(compiled, module)
        context = runtime.context

        returns_text = self.adapter.blocks_return_text
        call_block = self.adapter.call_block

        def block(x, c, active=None):  # `active`: ToCa runs a subset of a dense step's tokens
            extra = arguments if active is None else self.adapter.block_arguments(arguments, active)
            out = on_tokens(context, active, lambda: call_block(original, x, c, extra))
            return out if returns_text else (c, out)  # a block that only reads the text leaves it as it was

        text, tokens = runtime.run_block(self.index, self.count, block, tokens, text)
        if rejoin is not None:
            return rejoin(text, tokens)
        return (text, tokens) if returns_text else tokens


class TokenCachingProcessor:
    """What every family's attention processor holds: the step's context, its layer's key/value slots (one
    per branch), and where its tap queries start. diffusers re-creates processors from their class with no
    argument when it loads an IP-Adapter: that is refused here with the fix."""

    def __init__(self, context: AttentionContext | None = None, kv_slots: list[LayerKV] | None = None,
                 layer_index: int = 0) -> None:
        if context is None:
            raise RuntimeError("specdiff: disable before loading an IP-Adapter (specdiff.disable(pipe), load it, then "
                               "specdiff.enable(pipe) again); specdiff does not accelerate IP-Adapter calls yet")
        self.context = context
        self.kv_slots = kv_slots
        self.tap_offset = torch.tensor(layer_index * 7919)  # where this layer's tap queries start


class GraphsRefused(RuntimeError):
    """CUDA graphs cannot replay this model's calls as it is set up now."""


def _frozen(name: str, value):
    """A hashable stand-in for a non-tensor argument (part of a graph's key)."""
    if isinstance(value, torch.Tensor):
        raise GraphsRefused(f"specdiff cuda_graphs: the argument {name!r} holds a tensor inside a container; "
                            "run this call without cuda_graphs")
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(name, v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(name, v) for v in value)
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def attention_processors(model: torch.nn.Module) -> dict:
    """{name: processor} of every attention layer, in call order: diffusers' `attn_processors` where the
    model has it, else every submodule with a processor (a model without AttentionMixin, e.g. Z-Image)."""
    if hasattr(type(model), "attn_processors"):
        return dict(model.attn_processors)
    return {f"{name}.processor": module.processor for name, module in model.named_modules()
            if hasattr(module, "set_processor") and hasattr(module, "processor")}


def set_attention_processors(model: torch.nn.Module, processors: dict) -> None:
    if hasattr(type(model), "set_attn_processor"):
        model.set_attn_processor(processors)
        return
    for name, processor in processors.items():
        model.get_submodule(name.removesuffix(".processor")).set_processor(processor)


def offloading_of(model: torch.nn.Module) -> str | None:
    """What moves this model's weights per call (accelerate's or diffusers' offloading), if anything."""
    for name, module in model.named_modules():
        if getattr(module, "_hf_hook", None) is not None:
            return "accelerate's offload hooks" + (f" (on {name})" if name else "")
        registry = getattr(module, "_diffusers_hook", None)
        for hook_name in getattr(registry, "hooks", {}) or {}:
            if "offload" in hook_name or "layer_execution" in hook_name:
                return f"diffusers' {hook_name!r} hook" + (f" on {name}" if name else "")
    return None


def model_fingerprint(model: torch.nn.Module) -> int:
    """What a captured graph depends on besides its inputs: the weights' storage, the attention
    processors and backends, LoRA adapters and their scales, compiled blocks."""
    weights = tuple((p.data_ptr(), p.dtype) for p in model.parameters())
    processors = tuple((name, id(proc), getattr(proc, "_attention_backend", None))
                       for name, proc in attention_processors(model).items())
    lora, compiled = [], []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict):  # a PEFT LoRA layer
            lora.append((name, tuple(sorted(module.scaling.items())), _frozen(name, getattr(module, "active_adapters", ())),
                         bool(getattr(module, "disable_adapters", False)), bool(getattr(module, "merged", False))))
        compiled.append(getattr(module, "_compiled_call_impl", None) is not None)
    return hash((weights, processors, tuple(lora), tuple(compiled)))


class _StepGraphHook(_ModelHook):
    """A diffusers ModelHook on the transformer: each real-pass call is prepared on the host, then run
    from the graph of its kind (StepGraphs), then finished on the host. The speculative pass and plain
    calls run as without graphs."""

    def __init__(self, adapter: "Adapter") -> None:
        super().__init__()
        self.adapter = adapter  # its `graphs` holds the captured graphs
        self.generation = 0
        self.fingerprint = None

    def check_model(self, module) -> None:
        """Once per generation: refuse what moves weights per call; drop the graphs when what they
        were captured from changed (they are captured again)."""
        graphs = self.adapter.graphs
        offloading = offloading_of(module)
        if offloading is not None:
            raise GraphsRefused(f"specdiff cuda_graphs cannot replay a model whose weights move per call "
                                f"({offloading}): remove the offloading or enable with cuda_graphs=False")
        device = next(module.parameters()).device
        if graphs.device_type is not None and device.type != graphs.device_type:
            raise GraphsRefused(f"specdiff cuda_graphs=True needs the transformer on a CUDA device (it is on "
                                f"{device}); move it, or enable with cuda_graphs=False")
        fingerprint = model_fingerprint(module)
        if fingerprint != self.fingerprint:
            graphs.clear()
            self.fingerprint = fingerprint

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        adapter, runtime = self.adapter, self.adapter.runtime
        original = self.fn_ref.original_forward
        if runtime.phase is None and runtime.auto_num_steps is None:
            return original(*args, **kwargs)  # a plain call
        arguments = dict(self.signature.bind(*args, **kwargs).arguments)
        hidden = arguments["hidden_states"]
        prepared = runtime.prepare_step(runtime.context.timestep, hidden.shape[0], adapter.image_tokens(arguments),
                                        hidden.device)
        if prepared is None or prepared.phase != "real":
            return original(*args, **kwargs)  # begin_step / end_step run the prepared step as without graphs
        if runtime.generation != self.generation:
            self.check_model(module)
            self.generation = runtime.generation
        if torch.is_grad_enabled():
            runtime.abort()
            raise GraphsRefused("specdiff cuda_graphs replays inference calls: call the model under torch.no_grad() "
                                "or torch.inference_mode() (pipelines do), or enable with cuda_graphs=False")
        return_dict = arguments.pop("return_dict", True)
        tensors = {name: value for name, value in arguments.items() if isinstance(value, torch.Tensor)}
        others = {name: value for name, value in arguments.items() if not isinstance(value, torch.Tensor)}
        key = (prepared, tuple((n, t.shape, t.dtype, t.device) for n, t in tensors.items()),
               tuple((n, _frozen(n, v)) for n, v in others.items()))
        runtime.defer_finish = True
        try:
            sample = adapter.graphs.run(key, tensors, lambda static: original(**others, **static, return_dict=False)[0])
        finally:
            runtime.defer_finish = False
        runtime.finish_step()
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)


class Adapter:
    """One per model family: the pieces of its transformer the engine hooks into."""

    model_types: tuple[type, ...] = ()
    embed_module = ""  # its output: the (B, N, D) image tokens
    head_module = ""  # its output: the (B, N, P) per-token outputs, before un-patchifying
    position_module = ""  # optional; its output: positions applied inside attention (FLUX's RoPE), per token
    block_lists: tuple[str, ...] = ()  # block list attributes, in call order
    blocks_return_text = True  # blocks return (text, image); False: the image stream only (cross-attention)
    timestep_scale = 1.0  # the runtime's timesteps in the 0-1000 range of the summaries
    timestep_argument = "timestep"  # the forward argument that holds the call's timestep
    conditional_rows_first = False  # a CFG batch's conditional rows: the second half (SD3), or the first (Z-Image)
    graphs_refused: str | None = None  # why this family's calls cannot be replayed from CUDA graphs (None: they can)
    refused_arguments: dict[str, str] = {}  # forward argument -> what specdiff does not accelerate yet
    refused_pipeline_arguments: dict[str, str] = {}  # pipeline call argument -> what it does not accelerate yet

    def refuse_pipeline_call(self, arguments: dict) -> str | None:
        """What in a pipeline call's arguments the engine cannot honour yet, or None; checked before any work.
        Default: the arguments of refused_pipeline_arguments that are given."""
        for name, what in self.refused_pipeline_arguments.items():
            if arguments.get(name) is not None:
                return f"{what} ({name}=)"
        return None

    def to_schedule(self, value: float) -> float:
        """The call's timestep argument in the scheduler's units (the summaries' 0-1000 range)."""
        return value * self.timestep_scale

    def text_length(self, arguments: dict) -> int:
        """Text tokens of a call (0: none), from its forward arguments."""
        text = arguments.get("encoder_hidden_states")
        return text.shape[1] if isinstance(text, torch.Tensor) else 0

    def processor_for(self, name: str, original, kv_slots, layer_index: int):
        """The processor installed for the attention layer `name` (default: the family's caching
        processor everywhere; a family whose refiner layers run outside the engine's step keeps theirs)."""
        return self.make_processor(kv_slots, layer_index)

    @classmethod
    def supports(cls, model) -> bool:
        return isinstance(model, cls.model_types)

    @classmethod
    def unsupported(cls, model) -> str | None:
        """Why this model of the family cannot be accelerated (a variant the engine cannot honour), or None."""
        return None

    def refuse_call(self, arguments: dict) -> str | None:
        """What in this call's arguments the engine cannot honour yet (besides refused_arguments), or None."""
        return None

    @staticmethod
    def cfg_groups(arguments: dict) -> int:
        """How the family's pipelines lay out classifier-free guidance, from the call's arguments:
        2 when one transformer call holds [uncond, cond] rows, 1 otherwise."""
        raise NotImplementedError

    def __init__(self, model: torch.nn.Module, runtime: Runtime) -> None:
        self.model = model
        self.runtime = runtime
        self._original_processors = None
        self._handles = []
        self._hooked_blocks = []
        self._signature = inspect.signature(type(model).forward)
        self._default_compilation = BlockCompilation({})
        self.schedule: ScheduleReader | None = None  # set by enable when a pipeline (and its scheduler) drives the model
        self.graphs: StepGraphs | None = None  # set by enable with cuda_graphs: real-pass calls replayed from graphs

    def compiled_block_forward(self, block, original):
        """The block class's forward compiled once for all its blocks, when the blocks are compiled
        (regional compilation) and `original` is that plain forward (no other hook between), else None.
        Kept on the transformer with the compile options, so every block, and every later enable,
        reuses its graphs."""
        if getattr(block, "_compiled_call_impl", None) is None:
            return None
        forward = type(block).forward
        if getattr(original, "__func__", None) is not forward:
            return None
        # blocks compiled without specdiff.compile_blocks: default options, kept by this adapter (the
        # transformer is left as enable found it)
        compilation = getattr(self.model, BLOCK_COMPILATION_ATTR, None) or self._default_compilation
        if type(block) not in compilation.forwards:
            compilation.forwards[type(block)] = torch.compile(forward, **compilation.options)
        return compilation.forwards[type(block)]

    def make_processor(self, kv_slots, layer_index: int):
        """The family's attention processor for one layer; kv_slots: that layer's LayerKV per branch."""
        raise NotImplementedError

    def image_tokens(self, arguments: dict) -> int:
        """Image tokens of a call, from its forward arguments (before the embedding runs)."""
        raise NotImplementedError

    def positions_of(self, positions, active: torch.Tensor):
        """The position_module's output for the image tokens `active` (B, n) only (and all text tokens)."""
        raise NotImplementedError

    def block_streams(self, block, arguments: dict):
        """(image tokens, text tokens, other arguments, rejoin or None) of a block call's bound arguments,
        for block-level methods: a block that takes its streams joined is split here, and
        `rejoin(text, image)` makes its return value. Default: `hidden_states` and `encoder_hidden_states`."""
        tokens, text = arguments.pop("hidden_states"), arguments.pop("encoder_hidden_states")
        return tokens, text, arguments, None

    def call_block(self, forward, tokens, text, arguments: dict):
        """Run a block's forward on (image tokens, text); returns what the block returns."""
        return forward(hidden_states=tokens, encoder_hidden_states=text, **arguments)

    def block_arguments(self, arguments: dict, active: torch.Tensor) -> dict:
        """A block's other arguments when it runs only the image tokens `active` (ToCa): per-token ones
        (positions) cut to those tokens. Default: nothing is per token."""
        return arguments

    # -- hooks -----------------------------------------------------------------
    def _on_call(self, module, args, kwargs):
        self.runtime.calls[threading.get_ident()] = True  # _after_call clears it, also after an error
        arguments = self._signature.bind(module, *args, **kwargs).arguments
        accelerated = self.runtime.phase is not None or self.runtime.auto_num_steps is not None
        for name, what in (self.refused_arguments.items() if accelerated else ()):  # plain calls run as stock
            value = arguments.get(name)
            if value is not None and value is not False and not (isinstance(value, (list, tuple)) and not value):
                raise NotImplementedError(f"specdiff does not accelerate {type(module).__name__} with {what} yet")
        refused = self.refuse_call(arguments) if accelerated else None
        if refused is not None:
            raise NotImplementedError(f"specdiff does not accelerate {type(module).__name__} with {refused} yet")
        attention_kwargs = arguments.get("joint_attention_kwargs") or arguments.get("attention_kwargs") or {}
        if accelerated and "ip_adapter_image_embeds" in attention_kwargs:
            raise NotImplementedError(f"specdiff does not accelerate {type(module).__name__} with an IP-Adapter yet")
        context = self.runtime.context  # per thread: a plain call elsewhere cannot change it
        if not accelerated:
            return None  # a plain call: nothing to read
        timestep = arguments[self.timestep_argument]
        if self.schedule is not None:
            context.timestep = self.schedule.read(timestep, self.to_schedule)
        else:  # a bare transformer: the caller's loop, no scheduler to read
            context.timestep = self.to_schedule(timestep_value(timestep))
        context.text_length = self.text_length(arguments)
        context.conditional_first = self.conditional_rows_first
        return None

    def _after_call(self, module, args, output):
        self.runtime.calls.pop(threading.get_ident(), None)
        return None

    def _on_embed(self, module, args, tokens):
        timestep = self.runtime.context.timestep
        active = self.runtime.begin_step(timestep, tokens.shape[0], tokens.shape[1], tokens.device)
        return gather_tokens(tokens, active)

    def _on_positions(self, module, args, positions):
        # once per step, outside the compiled blocks: picked inside a block, every step's new token set
        # would be a new guard, and the block would recompile every step
        context = self.runtime.context
        if not context.enabled or context.active is None:
            return positions
        return self.positions_of(positions, context.active)

    def _on_head(self, module, args, outputs):
        return self.runtime.end_step(outputs)

    def step_hooks(self, model) -> list:
        """The hooks that plan a step, pick its tokens and fill in the rest (their handles): by default
        the plan at the embedding, which returns the tokens that run, the positions picked at the position
        module, and the fill at the head. A family whose positions come before its embedding, or whose
        embedding is not a token sequence, plans elsewhere (Wan)."""
        handles = [model.get_submodule(self.embed_module).register_forward_hook(self._on_embed),
                   model.get_submodule(self.head_module).register_forward_hook(self._on_head)]
        if self.position_module:
            handles.append(model.get_submodule(self.position_module).register_forward_hook(self._on_positions))
        return handles

    def without_cfg(self, arguments: dict) -> dict:
        """The pipeline arguments that run a call without classifier-free guidance (the speculative pass on
        the conditional rows): batched CFG off, or the negative branch's arguments dropped."""
        changes = {}
        if self.runtime.cfg_groups == 2:
            changes["guidance_scale"] = 1.0  # conditional rows only
        if (arguments.get("true_cfg_scale") or 1.0) > 1.0:
            changes["true_cfg_scale"] = 1.0  # FLUX, Qwen-Image: no negative branch
            for key in ("negative_prompt", "negative_prompt_2", "negative_prompt_embeds",
                        "negative_prompt_embeds_mask", "negative_pooled_prompt_embeds"):
                if arguments.get(key) is not None:
                    changes[key] = None  # else the pipeline warns that it is given and unused
        return changes

    # -- install / uninstall ---------------------------------------------------------
    def blocks(self) -> list[torch.nn.Module]:
        return [block for name in self.block_lists for block in getattr(self.model, name)]

    def install(self) -> None:
        model = self.model
        self._original_processors = attention_processors(model)
        processors = {}
        slots = self.runtime.new_kv_slots(len(self._original_processors))
        for index, name in enumerate(self._original_processors):
            processor = self.processor_for(name, self._original_processors[name], slots[index], index)
            backend = getattr(self._original_processors[name], "_attention_backend", None)
            if hasattr(processor, "_attention_backend") and backend is not None:
                processor._attention_backend = backend  # a backend chosen before enable stays chosen
            processors[name] = processor
        set_attention_processors(model, processors)
        self._handles = [
            model.register_forward_pre_hook(self._on_call, with_kwargs=True),
            model.register_forward_hook(self._after_call, always_call=True),
            *self.step_hooks(model),
        ]
        if self.graphs is not None:
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(model).register_hook(_StepGraphHook(self), _GRAPH_HOOK)
            self.runtime.keep_buffers = True  # a graph reads the same buffers in every generation
        if self.runtime.policy.block_level:
            from diffusers.hooks import HookRegistry

            blocks = self.blocks()
            for index, block in enumerate(blocks):
                HookRegistry.check_if_exists_or_initialize(block).register_hook(
                    _BlockHook(self, index, len(blocks)), _BLOCK_HOOK)
                self._hooked_blocks.append(block)

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for block in self._hooked_blocks:
            block._diffusers_hook.remove_hook(_BLOCK_HOOK, recurse=False)
        self._hooked_blocks = []
        if self.graphs is not None:
            registry = getattr(self.model, "_diffusers_hook", None)
            if registry is not None and _GRAPH_HOOK in registry.hooks:
                registry.remove_hook(_GRAPH_HOOK, recurse=False)
            self.graphs.clear()
            self.runtime.keep_buffers = False
            self.runtime.release_buffers()
        if self._original_processors is not None:
            current = attention_processors(self.model)
            for name, original in self._original_processors.items():
                backend = getattr(current.get(name), "_attention_backend", None)
                if backend is not None and hasattr(original, "_attention_backend"):
                    original._attention_backend = backend  # a backend chosen while enabled stays chosen
            set_attention_processors(self.model, self._original_processors)
            self._original_processors = None
