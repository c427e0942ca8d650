"""One call to accelerate a stock diffusers pipeline (or bare transformer), one to undo it.

    specdiff.enable(pipe, specdiff.SpecDiffConfig(cache_ratio=0.9))
    image = pipe(prompt).images[0]
    print(specdiff.summary(pipe))
    specdiff.disable(pipe)

Only the given instance changes. On a pipeline, its class is swapped for a
per-instance subclass (same name) whose __call__ runs the speculative pass
and brackets the generation; `disable` puts the original class back.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Callable

import torch

from specdiff.adapters.base import Adapter, offloading_of
from specdiff.engine.graphs import StepGraphs
from specdiff.adapters.flux import FluxAdapter
from specdiff.adapters.flux2 import Flux2Adapter
from specdiff.adapters.qwenimage import QwenImageAdapter
from specdiff.adapters.sd3 import SD3Adapter
from specdiff.adapters.wan import WanAdapter
from specdiff.adapters.zimage import ZImageAdapter
from specdiff.engine.runtime import GenerationSummary, Runtime
from specdiff.engine.policy import PolicyConfig
from specdiff.policies.registry import make_policy
from specdiff.policies.specdiff import SpecDiffConfig

ADAPTERS: tuple[type[Adapter], ...] = (SD3Adapter, FluxAdapter, Flux2Adapter, QwenImageAdapter, WanAdapter,
                                       ZImageAdapter)
SUPPORTED = ("diffusers SD3Transformer2DModel (SD3, SD3.5, the embedded model), FluxTransformer2DModel (FLUX.1), "
             "Flux2Transformer2DModel (FLUX.2 [dev] / [klein]), QwenImageTransformer2DModel (Qwen-Image), "
             "WanTransformer3DModel (Wan 2.1 / 2.2 text-to-video) and ZImageTransformer2DModel (Z-Image)")

_STATE_ATTR = "_specdiff_state"
# The last summary of each transformer, still readable after disable (weak: kept no longer than the model).
_LAST_SUMMARY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class UnsupportedModelError(TypeError):
    """The object is not a pipeline or transformer that specdiff can accelerate."""


class _State:
    """What enable put on a transformer (and pipeline); copying or pickling it would share or lose the
    per-process caches and hooks, so both are refused with the fix."""

    def __reduce_ex__(self, protocol):
        raise TypeError("specdiff: an enabled model cannot be pickled (its caches and hooks are per process); "
                        "call specdiff.disable first, and enable again after loading")

    def __deepcopy__(self, memo):
        raise TypeError("specdiff: an enabled model cannot be copied (the copy would share its hooks and caches); "
                        "copy it before specdiff.enable, or disable, copy, and enable each copy")

    def __init__(self, adapter: Adapter, runtime: Runtime, pipeline=None, original_class=None) -> None:
        self.adapter = adapter
        self.runtime = runtime
        self.pipeline = pipeline
        self.original_class = original_class
        # a pipeline's second transformer (Wan 2.2 A14B's transformer_2, the low-noise stage): its own
        # engine state, enabled and disabled with the pipeline
        self.second: _State | None = None
        self.part_of: _State | None = None  # on the second transformer's state: the pipeline's

    def members(self) -> list[_State]:
        return [self] + ([self.second] if self.second is not None else [])


def _transformer_of(obj):
    if isinstance(obj, torch.nn.Module):
        return obj, None
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, obj
    raise UnsupportedModelError(
        f"specdiff.enable expects a diffusers pipeline with a .transformer or a transformer model, "
        f"got {type(obj).__name__}; supported: {SUPPORTED}"
    )


def _adapter_for(transformer) -> type[Adapter]:
    for adapter in ADAPTERS:
        if adapter.supports(transformer):
            reason = adapter.unsupported(transformer)
            if reason is not None:
                raise UnsupportedModelError(f"{type(transformer).__name__} {reason}; supported: {SUPPORTED}")
            return adapter
    raise UnsupportedModelError(f"{type(transformer).__name__} is not supported; supported: {SUPPORTED}")


def _other_cache(transformer) -> str | None:
    """The name of another library's cache installed on the transformer, if any."""
    if getattr(transformer, "_cache_config", None) is not None:  # diffusers' CacheMixin.enable_cache
        return f"diffusers' {type(transformer._cache_config).__name__}"
    for name, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook_name in getattr(registry, "hooks", {}) or {}:
            if any(word in hook_name for word in ("cache", "fbc", "broadcast", "taylorseer")):
                return f"diffusers' {hook_name!r} hook" + (f" on {name}" if name else "")
    if any(getattr(transformer, attr, False) for attr in ("_is_cached", "_is_cache_dit_enabled")):
        return "cache-dit"
    return None


def enable(obj, config: PolicyConfig | None = None, *, num_inference_steps: int | None = None, seed: int = 0,
           cfg_batch: bool = False, cuda_graphs: bool | str = False):
    """Accelerate `obj` (a pipeline, or a bare transformer given num_inference_steps).

    config: any method's config (default SpecDiffConfig()). seed: for
    policies that draw random numbers, an integer in [0, 2**63). cfg_batch (bare transformer only; a
    pipeline's guidance says it): the transformer's batch is [unconditional, conditional] halves, as the
    SD3 pipelines batch classifier-free guidance, so rows r and r + B/2 belong to one prompt.
    cuda_graphs: True replays each kind of real-pass transformer call from a CUDA graph (token-level
    methods and full compute; the model on a CUDA device, no offloading): the host issues one launch
    per call instead of thousands. Graphs are captured on a kind's second call, kept across generations
    of the same shapes with the engine's buffers, captured again when the weights, LoRA adapters or
    scales, attention processors or compiled blocks changed (checked once per generation), and freed
    by disable. "eager": the same static buffers and kinds of call, run without capture (checks the
    graph path on a CPU). Returns obj.
    """
    config = config if config is not None else SpecDiffConfig()
    if not isinstance(config, PolicyConfig):
        raise TypeError(f"config must be a specdiff config (e.g. SpecDiffConfig), got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"enable(seed=...) must be an integer in [0, 2**63), got {seed!r}")
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
    ):
        raise ValueError(f"enable(num_inference_steps=...) must be an integer >= 1, got {num_inference_steps!r}")
    if not isinstance(cfg_batch, bool):
        raise ValueError(f"enable(cfg_batch=...) must be True or False, got {cfg_batch!r}")
    if num_inference_steps is not None and not isinstance(obj, torch.nn.Module):
        raise ValueError("enable(num_inference_steps=...) is for a bare transformer; a pipeline takes its steps in "
                         f"its call: pipe(prompt, num_inference_steps={num_inference_steps})")
    if cuda_graphs not in (False, True, "eager") or isinstance(cuda_graphs, (int, float)) and not isinstance(cuda_graphs, bool):
        raise ValueError(f"enable(cuda_graphs=...) must be False, True or 'eager', got {cuda_graphs!r}")
    transformer, pipeline = _transformer_of(obj)
    second = getattr(pipeline, "transformer_2", None) if pipeline is not None else None
    second = second if isinstance(second, torch.nn.Module) else None
    if second is not None and _adapter_for(second) is not _adapter_for(transformer):
        raise UnsupportedModelError(f"{type(pipeline).__name__}'s transformer_2 is a {type(second).__name__}, of "
                                    f"another family than its transformer ({type(transformer).__name__})")
    if cfg_batch and pipeline is not None:
        raise ValueError("enable(cfg_batch=True) is for a bare transformer; a pipeline's guidance_scale says it")
    adapter_type = _adapter_for(transformer)
    existing = getattr(transformer, _STATE_ATTR, None) or (
        vars(pipeline).get(_STATE_ATTR) if pipeline is not None else None) or (
        getattr(second, _STATE_ATTR, None) if second is not None else None)
    if existing is not None:
        running = existing.runtime.running()
        if running is not None:
            raise RuntimeError(f"specdiff.enable refused: {running} is running on this {type(obj).__name__}; "
                               "enable another config after it returns, with specdiff.disable first")
        raise RuntimeError(f"specdiff is already enabled on this {type(obj).__name__}; call specdiff.disable first")
    for model in (transformer, second):
        other = _other_cache(model) if model is not None else None
        if other is not None:
            raise RuntimeError(f"{other} is already installed on this transformer; remove it before enabling specdiff "
                               "(two caches on one model would each skip work the other relies on)")
    policy = make_policy(config)
    if cuda_graphs:
        if adapter_type.graphs_refused is not None:
            raise ValueError(f"enable(cuda_graphs=...) cannot replay {type(transformer).__name__}: "
                             f"{adapter_type.graphs_refused}; enable with cuda_graphs=False")
        for model in (transformer, second):
            if model is not None:
                _check_graphs(model, policy, capture=cuda_graphs is True)
    if pipeline is None:
        if num_inference_steps is None:
            raise ValueError("on a bare transformer, enable needs num_inference_steps >= 1 (steps per generation)")
        if policy.speculative_steps > 0:
            raise ValueError(
                f"{type(config).__name__}.speculative_steps={policy.speculative_steps} needs the pipeline to run the "
                "speculative pass: pass the pipeline, or set speculative_steps=0 on a bare transformer"
            )
    state = _install(adapter_type, transformer, policy, seed, cuda_graphs, pipeline,
                     auto_num_steps=num_inference_steps if pipeline is None else None,
                     auto_cfg_groups=2 if cfg_batch else 1)
    if second is not None:  # its own policy and engine state: the two stages share nothing but the call
        state.second = _install(adapter_type, second, make_policy(config), seed, cuda_graphs, pipeline)
        state.second.part_of = state
    if pipeline is not None:
        state.pipeline = pipeline
        state.original_class = type(pipeline)
        vars(pipeline)[_STATE_ATTR] = state  # found again even if pipe.transformer is replaced
        pipeline.__class__ = _accelerated_class(type(pipeline))
    return obj


def _install(adapter_type, transformer, policy, seed: int, cuda_graphs, pipeline, auto_num_steps=None,
             auto_cfg_groups: int = 1) -> _State:
    runtime = Runtime(policy, seed=seed, auto_num_steps=auto_num_steps, auto_cfg_groups=auto_cfg_groups)
    adapter = adapter_type(transformer, runtime)
    if cuda_graphs:
        adapter.graphs = StepGraphs(cuda_graphs is True, runtime.buffers, runtime.buffer_addresses)
    adapter.install()
    if pipeline is not None:
        from specdiff.adapters.base import ScheduleReader

        adapter.schedule = ScheduleReader(pipeline)
    state = _State(adapter, runtime)
    setattr(transformer, _STATE_ATTR, state)
    return state


def _check_graphs(transformer, policy, capture: bool) -> None:
    """Refuse, before any work, what CUDA graphs cannot replay."""
    if policy.block_level:
        raise ValueError(f"enable(cuda_graphs=...) replays token-level methods and full compute; "
                         f"{policy.config.method!r} decides per block on the host: enable it with cuda_graphs=False")
    offloading = offloading_of(transformer)
    if offloading is not None:
        raise ValueError(f"enable(cuda_graphs=...) cannot replay a model whose weights move per call ({offloading}): "
                         "remove the offloading or enable with cuda_graphs=False")
    device = next(transformer.parameters()).device
    if capture and device.type != "cuda":
        raise ValueError(f"enable(cuda_graphs=True) needs the transformer on a CUDA device (it is on {device}); "
                         "cuda_graphs='eager' runs the same path without capture")


def compile_blocks(obj, *, recompile_limit: int = 64, **compile_options) -> int:
    """Regional compilation of the transformer's blocks, before or after `enable`: diffusers'
    `compile_repeated_blocks` where the model declares its blocks, else `torch.compile` per block
    (`compile_options` go to torch.compile). Returns the number of blocks compiled.

    Token-level methods (SpecDiff, RAS, random) trace with no graph break. Every block class shares
    one code object, and so one recompile limit, across all methods run in the process: each method
    adds a bounded set of variants (dense / sparse step, taps on / off, real / speculative pass, a
    last block that differs; SpecDiff 10-15, the others 0-3, none per block or per step), so dynamo's
    limit is raised to `recompile_limit` (never lowered); past it a block would silently run eager.
    Block-level methods keep their per-step decision outside the graph and compile each block's own
    forward.
    """
    if isinstance(recompile_limit, bool) or not isinstance(recompile_limit, int) or recompile_limit < 1:
        raise ValueError(f"compile_blocks(recompile_limit=...) must be an integer >= 1, got {recompile_limit!r}")
    transformer, _ = _transformer_of(obj)
    adapter_type = _adapter_for(transformer)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    from specdiff.adapters.base import BLOCK_COMPILATION_ATTR, BlockCompilation

    # block-level policies call each block's forward themselves, compiled with the same options
    setattr(transformer, BLOCK_COMPILATION_ATTR, BlockCompilation(dict(compile_options)))
    if getattr(transformer, "_repeated_blocks", None):
        before = sum(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules())
        transformer.compile_repeated_blocks(**compile_options)
        return sum(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules()) - before
    count = 0
    for name in adapter_type.block_lists:
        for block in getattr(transformer, name):
            block.compile(**compile_options)
            count += 1
    return count


def _state_of(obj) -> _State | None:
    if not isinstance(obj, torch.nn.Module):
        state = vars(obj).get(_STATE_ATTR) if hasattr(obj, "__dict__") else None
        if state is not None:
            return state
    transformer, _ = _transformer_of(obj)
    return getattr(transformer, _STATE_ATTR, None)


def disable(obj):
    """Restore `obj` exactly: original forward, attention processors and class. Returns obj."""
    state = _state_of(obj)
    if state is None:
        raise RuntimeError(f"specdiff is not enabled on this {type(obj).__name__}")
    if state.part_of is not None:
        raise RuntimeError(f"specdiff was enabled on this {type(obj).__name__} through its pipeline (its second "
                           "transformer): call specdiff.disable(pipe)")
    for member in state.members():
        running = member.runtime.running()
        if running is not None:
            raise RuntimeError(f"specdiff.disable refused: {running} is running on this {type(obj).__name__}; "
                               "disable it after the call returns (disabling now would corrupt that generation)")
    for member in state.members():
        member.runtime.abort()
        member.adapter.uninstall()
        if member.runtime.last_summary is not None:
            _LAST_SUMMARY[member.adapter.model] = member.runtime.last_summary
        vars(member.adapter.model).pop(_STATE_ATTR, None)
    if state.pipeline is not None:
        state.pipeline.__class__ = state.original_class
        vars(state.pipeline).pop(_STATE_ATTR, None)
    return obj


@contextlib.contextmanager
def accelerated(obj, config: PolicyConfig | None = None, **options):
    """`with specdiff.accelerated(pipe, config): ...` enables for the block and disables after it,
    also when the block raises. Yields a function that returns the last generation's summary."""
    enable(obj, config, **options)
    try:
        yield lambda: summary(obj)
    finally:
        if is_enabled(obj):  # disabled inside the block already: nothing to undo (and the block's error stays)
            disable(obj)


def observe(obj, observer) -> "Callable[[], None]":
    """Call `observer(event)` for every planned real step of an enabled obj (event: branch, step,
    timestep, the signals the policy read, its plan). Returns a function that stops it."""
    state = _state_of(obj)
    if state is None:
        raise RuntimeError(f"specdiff is not enabled on this {type(obj).__name__}")
    if not callable(observer):
        raise TypeError(f"specdiff.observe(obj, observer): observer must be callable with one StepEvent, "
                        f"got {type(observer).__name__}")
    if state.adapter.graphs is not None and state.adapter.graphs.capture:
        raise RuntimeError("specdiff.observe cannot see steps replayed from CUDA graphs (their plans never reach the "
                           "host): enable with cuda_graphs=False or 'eager' to observe")
    observers = state.runtime.observers
    observers.append(observer)
    return lambda: observer in observers and observers.remove(observer)


def is_enabled(obj) -> bool:
    return _state_of(obj) is not None


def summary(obj) -> GenerationSummary | None:
    """What the last generation did, step by step (None before the first); after `disable`, the last
    accelerated generation's."""
    state = _state_of(obj)
    if state is None:
        transformer, _ = _transformer_of(obj)
        if transformer in _LAST_SUMMARY:
            return _LAST_SUMMARY[transformer]
        raise RuntimeError(f"specdiff is not enabled on this {type(obj).__name__} and has no earlier summary")
    runtime = state.runtime
    current = runtime.summary if runtime.summary is not None and runtime.auto_num_steps else runtime.last_summary
    return current.resolve() if current is not None else None


# -- the pipeline side ---------------------------------------------------------

_CLASS_CACHE: dict[type, type] = {}


def _refuse_pickle(pipe, protocol=None):
    raise TypeError("specdiff: an enabled pipeline cannot be pickled (its caches and hooks are per process); "
                    "call specdiff.disable(pipe) first, and enable again after loading")


def _refuse_deepcopy(pipe, memo):
    raise TypeError("specdiff: an enabled pipeline cannot be copied (the copy would share its transformer's hooks "
                    "and caches); copy it before specdiff.enable, or disable, copy, and enable each copy")


def _accelerated_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(cls.__name__, (cls,), {
            "__call__": _accelerated_call, "__module__": cls.__module__, "__reduce_ex__": _refuse_pickle,
            "__deepcopy__": _refuse_deepcopy,
        })
    return _CLASS_CACHE[cls]


def _call_arguments(pipe, args, kwargs) -> inspect.BoundArguments:
    signature = inspect.signature(type(pipe).__mro__[1].__call__)
    bound = signature.bind(pipe, *args, **kwargs)
    bound.apply_defaults()
    return bound


def _generator_copy(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _speculation_generators(pipe, arguments: dict):
    """Generators that draw the same initial noise as the real pass will, without advancing any:
    copies of the user's generators, or of the global generator the pipeline would draw from.
    (Saving and restoring the global state instead would rewind other threads' draws.)"""
    generators = arguments.get("generator")
    if isinstance(generators, list):
        return [_generator_copy(g) for g in generators]
    if generators is not None:
        return _generator_copy(generators)
    device = getattr(pipe, "_execution_device", None) or pipe.transformer.device
    device = torch.device(device)
    copy = torch.Generator(device=device)
    copy.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    return copy


def _accelerated_call(pipe, *args, **kwargs):
    state: _State = vars(pipe)[_STATE_ATTR]
    for name, member in zip(("transformer", "transformer_2"), state.members()):
        if getattr(pipe, name, None) is not member.adapter.model:
            raise RuntimeError(
                f"pipe.{name} was replaced after specdiff.enable; call specdiff.disable(pipe) (it restores the "
                f"pipeline and the old transformer), then specdiff.enable(pipe, config) for the new one"
            )
        other = _other_cache(member.adapter.model)
        if other is not None:
            raise RuntimeError(f"{other} was installed on this transformer after specdiff.enable (pipe.{name}); two caches would "
                               "each skip work the other relies on: remove it, or specdiff.disable(pipe)")
    if state.second is None and isinstance(getattr(pipe, "transformer_2", None), torch.nn.Module):
        raise RuntimeError("pipe.transformer_2 was set after specdiff.enable; call specdiff.disable(pipe), then "
                           "specdiff.enable(pipe, config) to accelerate both transformers")
    runtime = state.runtime
    base_call = state.original_class.__call__
    bound = _call_arguments(pipe, args, kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    extra = arguments.pop("kwargs", None) or {}
    arguments.update(extra)
    num_steps = arguments.get("num_inference_steps")
    if arguments.get("timesteps") is not None:
        num_steps = len(arguments["timesteps"])
    if arguments.get("sigmas") is not None:
        num_steps = len(arguments["sigmas"])
    refused = state.adapter.refuse_pipeline_call(arguments)
    if refused is not None:
        raise NotImplementedError(f"specdiff does not accelerate {type(pipe).__name__} with {refused} yet: call "
                                  "specdiff.disable(pipe) for such calls")
    members = state.members()
    started = []
    try:
        for member in members:
            member.runtime.start_generation(int(num_steps), cfg_groups=state.adapter.cfg_groups(arguments))
            started.append(member)
        with _prompts_encoded_once(pipe):
            if runtime.policy.speculative_steps > 0:
                for member in members:
                    member.adapter.schedule.reset()
                _speculate(pipe, base_call, arguments, [m.runtime for m in members], state.adapter)
            for member in members:
                member.adapter.schedule.reset()  # each pass sets its own timesteps
            result = base_call(pipe, **arguments)
        for member in members:
            member.runtime.finish_generation()
        return result
    except BaseException:
        for member in started:
            member.runtime.abort()
        raise


def _same_argument(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    try:
        return bool(a == b)
    except Exception:
        return a is b


@contextlib.contextmanager
def _prompts_encoded_once(pipe):
    """The speculative and the real pass encode the same prompts: encode them once."""
    encode = getattr(pipe, "encode_prompt", None)
    if encode is None or "encode_prompt" in vars(pipe):
        yield
        return
    seen: list[tuple[tuple, dict, object]] = []

    def encode_once(*args, **kwargs):
        for old_args, old_kwargs, result in seen:
            if (
                len(old_args) == len(args) and old_kwargs.keys() == kwargs.keys()
                and all(_same_argument(x, y) for x, y in zip(old_args, args))
                and all(_same_argument(old_kwargs[k], kwargs[k]) for k in kwargs)
            ):
                return result
        result = encode(*args, **kwargs)
        seen.append((args, kwargs, result))
        return result

    pipe.encode_prompt = encode_once
    try:
        yield
    finally:
        vars(pipe).pop("encode_prompt", None)


def _speculate(pipe, base_call, arguments: dict, runtimes: list[Runtime], adapter: Adapter) -> None:
    import time

    tic = time.perf_counter()
    # lists copied: a pipeline may write into the prompt list it is given (ZImagePipeline applies its chat
    # template in place), and the real pass must see the user's prompts as they were
    spec_args = {key: list(value) if isinstance(value, list) else value for key, value in arguments.items()}
    spec_args.update(num_inference_steps=runtimes[0].policy.speculative_steps, output_type="latent")
    for key in ("timesteps", "sigmas", "callback_on_step_end"):
        if key in spec_args:
            spec_args[key] = None
    if not runtimes[0].policy.speculative_cfg:
        spec_args.update(adapter.without_cfg(spec_args))
    if spec_args.get("latents") is None:
        spec_args["generator"] = _speculation_generators(pipe, arguments)
    progress = getattr(pipe, "_progress_bar_config", None)
    for runtime in runtimes:
        runtime.start_speculation()
    try:
        pipe.set_progress_bar_config(disable=True)
        base_call(pipe, **spec_args)
    finally:
        if progress is None:
            vars(pipe).pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = progress
    for runtime in runtimes:  # each stage gets the maps of its own speculative calls (none: no maps)
        runtime.end_speculation()
    runtimes[0].summary.speculation_seconds = time.perf_counter() - tic
