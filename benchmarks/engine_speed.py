"""Engine benchmark: full compute vs SpecDiff on a random-weight SD3 transformer, CPU.

    python benchmarks/engine_speed.py --width 512 --layers 4 --size 128 --steps 28 --repeats 3
    python benchmarks/engine_speed.py --preset sd3-medium --blocks 2      # per call, at SD3-medium's shapes
    python benchmarks/engine_speed.py --preset tiny --repeats 1           # the same code path in seconds (CI)
    python benchmarks/engine_speed.py --host-overhead                     # host work per call, real block counts

Host-overhead mode (--host-overhead): what a call costs the host, the bound of a launch-bound call on a
GPU. Per kind of call (stock, dense through the engine, sparse SpecDiff / RAS at cache ratio 0.9, and the
CUDA-graph path, whose host work is what runs outside the graph): operators issued, counted at the real
models' block counts, widths and token counts (SD3-medium: 24 blocks, 4,096 image + 333 text tokens, CFG
batch 2; FLUX.1-dev: 19 + 38 blocks, 4,096 + 512 tokens) on the meta device (dispatched, nothing
computed); and host microseconds per call (median), timed on the CPU with the real block count at a
negligible width (one head of 32) and 256 image + 32 text tokens, so that compute is small beside
dispatch. A GPU adds a few microseconds of launch per operator eagerly, and one graph launch per
replayed call.

Per-call mode (--preset): a bare transformer with the preset's per-block shapes (SD3-medium / FLUX-dev
at 1024 px: 4,096 image tokens; width, heads, text tokens, CFG batch as the real model) and --blocks
blocks, called as in a generation with the timestep falling. Per method the stock call and SpecDiff's
sparse calls at each cache ratio, tapped (the paper's score: attention taps run) and untapped
(specdiff-study's importance="change": no taps); speculation off (it is dense calls at other timesteps). Each call timed
alone, wall-clock and process CPU time, the whole call and the span of its blocks; FLOPs per call and
per block span by FlopCounterMode in a separate pass.

Prints a Markdown table: wall-clock per generation (median of interleaved
repeats), the wall-clock speed-up (median of per-repeat ratios to full
compute, measured in the same repeat), the FLOPs ratio of the transformer,
and the share of the speculative pass and of scoring. Random weights: this
measures the engine's speed, not image quality.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import specdiff
from specdiff.lab.evaluation.flops import count_module_flops
from specdiff.lab.tiny_pipelines import tiny_sd3_pipeline



# -- per call at a model's real shapes (--preset) ----------------------------------------------------

PRESETS = {
    # per-block shapes of the real models at 1024 x 1024 (4,096 image tokens)
    "sd3-medium": dict(family="sd3", width_heads=24, head_dim=64, image_side=64, text_tokens=333, batch=2,
                       joint_dim=4096, pooled_dim=2048, in_channels=16),
    "flux-dev": dict(family="flux", width_heads=24, head_dim=128, image_side=64, text_tokens=512, batch=1,
                     joint_dim=4096, pooled_dim=768, in_channels=64),
    "tiny": dict(family="sd3", width_heads=2, head_dim=32, image_side=8, text_tokens=12, batch=2,
                 joint_dim=32, pooled_dim=32, in_channels=4),
    "tiny-flux": dict(family="flux", width_heads=2, head_dim=32, image_side=8, text_tokens=12, batch=1,
                      joint_dim=32, pooled_dim=32, in_channels=16),
}
# the real models' blocks (FLUX: double-stream, single-stream), for --host-overhead
REAL_BLOCKS = {"sd3-medium": 24, "flux-dev": (19, 38), "tiny": 2, "tiny-flux": (1, 1)}


def build(preset: dict, layers, device, dtype):
    """(transformer, call(step, num_steps) -> output) with random weights and inputs. layers: blocks, or for
    FLUX (double, single) blocks. On the meta device the model is built there (no memory, no values)."""
    torch.manual_seed(0)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = _model(preset, layers)
    else:
        model = _model(preset, layers)
    return model.to(device=device, dtype=dtype).eval(), _calls(preset, device, dtype)


def _model(preset: dict, layers):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    heads, head_dim, side = preset["width_heads"], preset["head_dim"], preset["image_side"]
    if preset["family"] == "sd3":
        return SD3Transformer2DModel(
            sample_size=side * 2, patch_size=2, in_channels=preset["in_channels"], out_channels=preset["in_channels"],
            num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=preset["joint_dim"], caption_projection_dim=heads * head_dim,
            pooled_projection_dim=preset["pooled_dim"], pos_embed_max_size=max(96, side * 2),
        )
    double, single = layers if isinstance(layers, tuple) else (max(1, layers // 2), max(1, layers - layers // 2))
    return FluxTransformer2DModel(
        patch_size=1, in_channels=preset["in_channels"], num_layers=double, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=preset["joint_dim"],
        pooled_projection_dim=preset["pooled_dim"], guidance_embeds=True,
        axes_dims_rope=(16, 56, 56) if head_dim == 128 else (8, 12, 12),
    )


def _calls(preset: dict, device, dtype):
    """call(model, step, steps) with the preset's random inputs, the timestep falling over `steps`."""
    side, b = preset["image_side"], preset["batch"]
    text = torch.randn(b, preset["text_tokens"], preset["joint_dim"], device=device, dtype=dtype)
    pooled = torch.randn(b, preset["pooled_dim"], device=device, dtype=dtype)
    if preset["family"] == "sd3":
        latents = torch.randn(b, preset["in_channels"], side * 2, side * 2, device=device, dtype=dtype)

        def call(model, step, steps):
            t = torch.full((b,), 1000.0 * (1 - step / steps), device=device, dtype=dtype)
            return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                         timestep=t, return_dict=False)[0]
        return call
    latents = torch.randn(b, side * side, preset["in_channels"], device=device, dtype=dtype)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3).to(device, dtype)
    text_ids = torch.zeros(preset["text_tokens"], 3, device=device, dtype=dtype)
    guidance = torch.full((b,), 3.5, device=device, dtype=dtype)

    def call(model, step, steps):
        t = torch.full((b,), 1 - step / steps, device=device, dtype=dtype)
        return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                     img_ids=image_ids, txt_ids=text_ids, guidance=guidance, return_dict=False)[0]
    return call


class CallTimer:
    """One call's wall-clock and process CPU seconds, and the same for the span of its blocks (first
    block's start to last block's end, via hooks). On a GPU wall-clock comes from CUDA events (the
    GPU's time, not the launch's) and CPU time is not meaningful (reported as None)."""

    def __init__(self, model, device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._marks = {}
        # marked on the modules just before and after the blocks, never on a block: a hook on a compiled
        # block would break its graph and add host time to every method's calls
        last_before = "pos_embed" if hasattr(model, "single_transformer_blocks") else "context_embedder"
        model.get_submodule(last_before).register_forward_hook(lambda *a: self._mark("blocks_start"))
        model.norm_out.register_forward_pre_hook(lambda *a: self._mark("blocks_end"))

    def _mark(self, name):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks[name] = event
        else:
            self._marks[name] = (time.perf_counter(), time.process_time())

    def __call__(self, fn) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        self._mark("start")
        tic = time.perf_counter()
        fn()
        launched = time.perf_counter() - tic  # the host's time to issue the call (no sync inside)
        self._mark("end")
        if self.cuda:
            torch.cuda.synchronize()
            m = self._marks
            # host close to wall: the GPU waits for launches, so fewer FLOPs cannot show as time
            return {"wall": m["start"].elapsed_time(m["end"]) / 1000, "cpu": None, "host": launched,
                    "blocks_wall": m["blocks_start"].elapsed_time(m["blocks_end"]) / 1000, "blocks_cpu": None}
        m = self._marks
        return {"wall": m["end"][0] - m["start"][0], "cpu": m["end"][1] - m["start"][1],
                "blocks_wall": m["blocks_end"][0] - m["blocks_start"][0],
                "blocks_cpu": m["blocks_end"][1] - m["blocks_start"][1]}


def call_flops(model, fn) -> tuple[int, int]:
    """(FLOPs of the whole call, FLOPs inside its blocks), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from specdiff.lab.evaluation.flops import _extra_mapping

    counter = FlopCounterMode(display=False, custom_mapping=_extra_mapping())
    with counter:
        fn()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    names = [f"{root}.{lst}.{i}" for lst in ("transformer_blocks", "single_transformer_blocks")
             for i in range(len(getattr(model, lst, [])))]
    return int(sum(counts.get(root, {}).values())), int(sum(sum(counts.get(n, {}).values()) for n in names))




def call_ops(model, fn) -> tuple[int, float]:
    """Kernel-launching operators of one call (ATen operators that are not views), outside the blocks and per
    block: on a GPU each launches at least one kernel, so a launch-bound call's time follows this count."""
    from torch.utils._python_dispatch import TorchDispatchMode

    blocks = [b for name in ("transformer_blocks", "single_transformer_blocks") for b in getattr(model, name, [])]

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.inside, self.counts = False, [0, 0]  # counts: outside, inside the blocks

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.counts[self.inside] += 1
            return func(*args, **(kwargs or {}))

    mode = Count()
    hooks = [blocks[0].register_forward_pre_hook(lambda *a: setattr(mode, "inside", True)),
             blocks[-1].register_forward_hook(lambda *a: setattr(mode, "inside", False))]
    try:
        with mode:
            fn()
    finally:
        for hook in hooks:
            hook.remove()
    return mode.counts[0], mode.counts[1] / len(blocks)


def measure_calls(args) -> list[dict]:
    """Per method the median dense and sparse call: wall-clock and process CPU time, whole call and
    blocks, and their ratios to the stock call against the FLOPs ratios."""
    import specdiff

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    model, call = build(preset, args.blocks, device, dtype)
    timer = CallTimer(model, device)
    if args.compile:
        specdiff.compile_blocks(model)
    # one dense call, a second one when the score needs an observed change first, then the sparse calls
    steps = args.calls + 2

    try:  # the study method has the untapped score ("change") and both-halves taps
        from specdiff.lab.studies import SpecDiffStudyConfig
    except ImportError:  # an older specdiff (benchmarks/before_after.py): they are SpecDiffConfig's fields
        SpecDiffStudyConfig = specdiff.SpecDiffConfig

    def config(ratio, tapped, **extra):
        # speculation off (it is dense calls at other timesteps); "change" needs no attention taps
        taps = {"tap_queries": args.tap_queries} if args.tap_queries else {}
        kind = specdiff.SpecDiffConfig if tapped and not extra else SpecDiffStudyConfig
        return kind(cache_ratio=ratio, speculative_steps=0, warmup_steps=1, reset_steps=(),
                    **(taps if tapped else {"importance": "change"}), **extra)

    # an older specdiff has no untapped score, no conditional-only taps and no CFG batch on a bare
    # transformer: those rows are left out
    fields = {f.name for f in dataclasses.fields(SpecDiffStudyConfig)}
    untapped = "importance" in fields
    # the SD3 presets' batch 2 is CFG's [uncond, cond]: the rows of one prompt share a selection
    cfg_batch = (preset["family"] == "sd3" and preset["batch"] == 2
                 and "cfg_batch" in inspect.signature(specdiff.enable).parameters)
    both_halves = cfg_batch and "tap_cfg" in fields  # the default taps the conditional rows only
    methods = [("stock", None)]
    for ratio in args.ratios:
        methods.append((f"specdiff {ratio:g} tapped", config(ratio, True)))
        if both_halves:
            methods.append((f"specdiff {ratio:g} tapped, both CFG halves", config(ratio, True, tap_cfg=True)))
        if untapped:
            methods.append((f"specdiff {ratio:g} untapped", config(ratio, False)))
    options = {"cfg_batch": True} if cfg_batch else {}
    measured = {name: {"dense": [], "sparse": []} for name, _ in methods}
    with torch.inference_mode():
        for _ in range(2):
            call(model, 0, steps)
        for repeat in tqdm(range(args.repeats + 1), desc="interleaved rounds"):  # round 0 warms up every variant
            for name, cfg in methods:
                if cfg is None:
                    results = [timer(lambda s=s: call(model, s, steps)) for s in range(steps)]
                    dense, sparse = results, []
                else:
                    kinds = []
                    with specdiff.accelerated(model, cfg, num_inference_steps=steps, **options):
                        specdiff.observe(model, lambda e: kinds.append("dense" if e.plan.compute is None else "sparse"))
                        results = [timer(lambda s=s: call(model, s, steps)) for s in range(steps)]
                    dense = [r for r, k in zip(results, kinds) if k == "dense"]
                    sparse = [r for r, k in zip(results, kinds) if k == "sparse"][: args.calls]
                if repeat:
                    measured[name]["dense"] += dense
                    measured[name]["sparse"] += sparse
        flops = {"stock": call_flops(model, lambda: call(model, 0, steps))}
        # compiled blocks run fused kernels that no dispatch mode sees: operators are counted eager only
        ops = {} if args.compile else {"stock": call_ops(model, lambda: call(model, 0, steps))}
        for name, cfg in methods[1:]:
            # each count in its own generation: a call repeating a timestep starts a new one (dense)
            for counts, count in [(flops, call_flops)] + ([(ops, call_ops)] if ops else []):
                with specdiff.accelerated(model, cfg, num_inference_steps=steps, **options):
                    call(model, 0, steps)
                    call(model, 1, steps)
                    counts[name] = count(model, lambda: call(model, 2, steps))
    stock = {k: statistics.median(r[k] for r in measured["stock"]["dense"]) for k in ("wall", "cpu", "blocks_wall", "blocks_cpu")
             if measured["stock"]["dense"][0][k] is not None}
    rows = []
    for name, cfg in methods:
        calls = measured[name]["sparse"] or measured[name]["dense"]
        median = {k: statistics.median(r[k] for r in calls) for k in stock}
        flops_ratio, block_flops_ratio = (flops["stock"][0] / flops[name][0], flops["stock"][1] / flops[name][1])
        row = {"method": name, "calls": len(calls), "flops_ratio": flops_ratio, "block_flops_ratio": block_flops_ratio,
               "ms_wall": 1000 * median["wall"]}
        if "host" in calls[0]:
            row["ms_host"] = 1000 * statistics.median(r["host"] for r in calls)
        if ops:
            row["ops_outside_blocks"], row["ops_per_block"] = ops[name]
        for kind in stock:
            ratio = stock[kind] / median[kind]
            row[f"efficiency_{kind}"] = ratio / (block_flops_ratio if kind.startswith("blocks") else flops_ratio)
        rows.append(row)
    return rows


def median_seconds(fn, device: torch.device, repeats: int = 10) -> float:
    """Median time of fn() over `repeats` runs after one warm-up run (synchronised on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def measure_parts(args, sparse_call_seconds: float, ratio: float, both_halves_call_seconds: float | None = None) -> list[dict]:
    """The engine's per-layer extras of a sparse call, each timed alone at the preset's shapes and scaled
    to the call's layers: the attention taps and the key/value write (active image rows and text rows
    into the layer's joint buffer). Medians of 20 runs; shares of the sparse call's median time."""
    try:
        from specdiff.engine.attention import AttentionContext, LayerKV, joint_kv, tap_attention
    except ImportError:  # an older specdiff (benchmarks/before_after.py): its parts differ
        return []
    p = PRESETS[args.preset]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batch, heads, dim, n_image, n_text = p["batch"], p["width_heads"], p["head_dim"], p["image_side"] ** 2, p["text_tokens"]
    active_count = max(1, round(n_image * (1 - ratio)))
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    active = torch.stack([torch.randperm(n_image, generator=generator)[:active_count] for _ in range(batch)]).to(device)
    ctx = AttentionContext()
    ctx.enabled, ctx.kv_branch, ctx.active = True, 0, active
    ctx.tap_queries = args.tap_queries or specdiff.SpecDiffConfig().tap_queries  # as in the tapped calls
    slot = LayerKV(rand(batch, heads, n_image + n_text, dim), rand(batch, heads, n_image + n_text, dim))
    image_kv = (rand(batch, heads, active_count, dim), rand(batch, heads, active_count, dim))
    text_kv = (rand(batch, heads, n_text, dim), rand(batch, heads, n_text, dim))
    queries, offset = rand(batch, heads, active_count, dim), torch.tensor(7919)
    def taps(rows):
        def run():
            ctx.tap_sum = torch.zeros(rows, n_image, device=device)
            tap_attention(ctx, offset, queries, None, slot.keys, slice(0, n_image))
        return run

    # each part with the sparse call it is a share of
    parts = {"key/value write": (lambda: joint_kv(ctx, [slot], *image_kv, *text_kv, text_first=False),
                                 sparse_call_seconds)}
    if p["family"] == "sd3" and batch == 2:  # a CFG batch: by default the taps read the conditional row only
        parts[f"attention taps ({ctx.tap_queries} queries), conditional rows"] = (taps(batch // 2), sparse_call_seconds)
        parts[f"attention taps ({ctx.tap_queries} queries), both CFG halves"] = (
            taps(batch), both_halves_call_seconds or sparse_call_seconds)
    else:
        parts[f"attention taps ({ctx.tap_queries} queries)"] = (taps(batch), sparse_call_seconds)
    layers = args.blocks  # one attention layer per block in both presets' families
    rows = []
    with torch.inference_mode():
        for name, (fn, call_seconds) in parts.items():
            per_layer = median_seconds(fn, device, repeats=20)
            rows.append({"part": name, "ms_per_layer": 1000 * per_layer, "layers": layers,
                         "share_of_sparse_call": per_layer * layers / call_seconds})
    return rows


class _KnownTimesteps:
    """Stands in for a pipeline's schedule reader: the host knows each call's timestep (meta tensors
    hold no value to read)."""

    def __init__(self) -> None:
        self.value = 0.0

    def reset(self) -> None:
        pass

    def read(self, timestep, scale: float) -> float:
        return self.value


def measure_host_overhead(args) -> list[dict]:
    """Per kind of call, operators issued and host microseconds (median), on the meta device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from specdiff.integration import _state_of

    preset = PRESETS[args.preset]
    dtype = getattr(torch, args.dtype)
    counted = build(preset, REAL_BLOCKS[args.preset], "meta", dtype)
    small = dict(preset, width_heads=1, head_dim=32, image_side=16, text_tokens=32, joint_dim=32, pooled_dim=32)
    timed = build(small, REAL_BLOCKS[args.preset], "cpu", dtype)
    steps = args.calls + 2
    ratio = max(args.ratios)
    dense = specdiff.SpecDiffConfig(warmup_steps=steps, speculative_steps=0)  # every step dense, through the engine
    tapped = specdiff.SpecDiffConfig(cache_ratio=ratio, warmup_steps=1, reset_steps=(), speculative_steps=0)
    ras = specdiff.RASConfig(cache_ratio=ratio, warmup_steps=1, reset_steps=())
    options = {"cfg_batch": True} if preset["family"] == "sd3" and preset["batch"] == 2 else {}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0
            self.paused = False  # inside a step run as a graph would be: not issued by the host

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and not self.paused:
                self.count += 1
            return func(*args, **(kwargs or {}))

    def run(model_call, config, graphs: bool, count: bool):
        """(kind, operators or None, host seconds) of every call of one generation."""
        model, call = model_call
        counter = Count() if count else contextlib.nullcontext()
        results = []
        if config is None:
            for step in range(steps):
                tic = time.perf_counter()
                with counter:
                    call(model, step, steps)
                results.append(("stock", counter.count if count else None, time.perf_counter() - tic))
                counter = Count() if count else counter
            return results
        specdiff.enable(model, config, num_inference_steps=steps, cuda_graphs="eager" if graphs else False, **options)
        try:
            state = _state_of(model)
            state.adapter.schedule = schedule = _KnownTimesteps()
            inside = [0.0]
            if graphs:
                run_graph = state.adapter.graphs.run

                def timed_run(key, inputs, step_fn):
                    def step(static):  # the step itself: replayed on a GPU, not issued by the host
                        tic = time.perf_counter()
                        if count:
                            counter.paused = True
                        try:
                            return step_fn(static)
                        finally:
                            if count:
                                counter.paused = False
                            inside[0] += time.perf_counter() - tic
                    return run_graph(key, inputs, step)
                state.adapter.graphs.run = timed_run
            for step in range(steps):
                schedule.value = 1000.0 * (1 - step / steps)
                inside[0] = 0.0
                if count:
                    counter.count = 0
                tic = time.perf_counter()
                with counter:
                    call(model, step, steps)
                host = time.perf_counter() - tic - inside[0]
                kind = "graph" if graphs else state.runtime.summary.records[-1].kind
                results.append((kind, counter.count if count else None, host))
        finally:
            specdiff.disable(model)
        return results

    rows = []
    cases = [("stock", None, False, "stock"), ("full compute through the engine", dense, False, "dense"),
             (f"SpecDiff {ratio:g}, tapped", tapped, False, "sparse"), (f"RAS {ratio:g}", ras, False, "sparse"),
             (f"SpecDiff {ratio:g}, CUDA-graph path (host work outside the graph)", tapped, True, "graph"),
             (f"RAS {ratio:g}, CUDA-graph path (host work outside the graph)", ras, True, "graph")]
    samples = {name: [] for name, *_ in cases}
    operators = {}
    with torch.inference_mode():
        for name, config, graphs, kind in cases:  # operators: one generation, real shapes
            operators[name] = statistics.median(c[1] for c in run(counted, config, graphs, True) if c[0] == kind)
        for repeat in range(args.repeats + 1):  # host time: interleaved rounds, round 0 warms up
            for name, config, graphs, kind in cases:
                calls = [c for c in run(timed, config, graphs, False) if c[0] == kind]
                if repeat:
                    samples[name] += calls
    for name, *_ in cases:
        calls = samples[name]
        rows.append({"call": name, "calls": len(calls), "operators": operators[name],
                     "host_us": 1e6 * statistics.median(c[2] for c in calls)})
    return rows


def host_table(rows, args) -> str:
    blocks = REAL_BLOCKS[args.preset]
    blocks = blocks if isinstance(blocks, int) else f"{blocks[0]} + {blocks[1]}"
    p = PRESETS[args.preset]
    lines = [f"{args.preset}: {blocks} blocks, batch {p['batch']}, {args.dtype}; operators counted at "
             f"{p['image_side'] ** 2} image + {p['text_tokens']} text tokens and the real width (meta device); host "
             f"time at 256 + 32 tokens, one head of 32, CPU, {torch.get_num_threads()} threads; medians over "
             f"{args.repeats} rounds x {args.calls} calls", "",
             "| call | calls | operators issued per call | host us per call | host us per operator |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['call']} | {r['calls']} | {r['operators']:.0f} | {r['host_us']:.0f} | "
                     f"{r['host_us'] / max(r['operators'], 1):.1f} |")
    return "\n".join(lines) + ("\n\noperators: ATen operators that are not views (each at least one kernel launch on a "
                               "GPU); CUDA-graph path: the host's work per replayed call besides the graph launch "
                               "itself (planning on the host, input copies, bookkeeping)")


def calls_table(rows, args) -> str:
    p = PRESETS[args.preset]
    device = (torch.cuda.get_device_name(torch.device(args.device)) if torch.device(args.device).type == "cuda"
              else f"CPU, {torch.get_num_threads()} threads")
    head = (f"{args.preset} per-block shapes, random weights: {args.blocks} blocks, {p['image_side'] ** 2} image + "
            f"{p['text_tokens']} text tokens, batch {p['batch']}, {args.dtype}, {device}"
            + (", blocks compiled" if args.compile else "") + f"; medians over {args.repeats} rounds x {args.calls} calls\n\n")
    cpu, host, ops = "efficiency_cpu" in rows[0], "ms_host" in rows[0], "ops_per_block" in rows[0]
    lines = ["| method | calls | ms / call |" + (" host ms to launch |" if host else "")
             + (" operators outside blocks | operators per block |" if ops else "")
             + " FLOPs ratio (call) | FLOPs ratio (blocks) | efficiency, call, wall | "
             "efficiency, blocks, wall |" + (" efficiency, call, CPU time | efficiency, blocks, CPU time |" if cpu else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if host else "") + ("---|---|" if ops else "")
             + ("---|---|" if cpu else "")]
    for r in rows:
        line = (f"| {r['method']} | {r['calls']} | {r['ms_wall']:.1f} |" + (f" {r['ms_host']:.1f} |" if host else "")
                + (f" {r['ops_outside_blocks']} | {r['ops_per_block']:.1f} |" if ops else "")
                + f" {r['flops_ratio']:.2f}x | {r['block_flops_ratio']:.2f}x | "
                f"{100 * r['efficiency_wall']:.0f} % | {100 * r['efficiency_blocks_wall']:.0f} % |")
        if cpu:
            line += f" {100 * r['efficiency_cpu']:.0f} % | {100 * r['efficiency_blocks_cpu']:.0f} % |"
        lines.append(line)
    return head + "\n".join(lines) + ("\n\nefficiency = (stock time / method time) / (stock FLOPs / method FLOPs): "
                                       "100 % turns the whole FLOPs cut into time; sparse calls for the specdiff rows"
                                       + ("; host ms to launch: the host's time to issue the call, which bounds "
                                          "the call's time when it nears ms / call" if host else "")
                                       + ("; operators: ATen operators that are not views, each at least one "
                                          "kernel launch on a GPU (counted eager, one call)" if ops else ""))

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="per-call mode at a model's real per-block shapes (see below); default: whole generations")
    p.add_argument("--blocks", type=int, default=2, help="--preset: transformer blocks")
    p.add_argument("--calls", type=int, default=4, help="--preset: sparse calls per generation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="--preset")
    p.add_argument("--compile", action="store_true", help="--preset: regional torch.compile of the blocks first")
    p.add_argument("--host-overhead", action="store_true",
                   help="operators and host microseconds per call at the preset's real block count, on the meta device")
    p.add_argument("--parts", action="store_true",
                   help="--preset: also time the taps and the key/value write alone, as shares of a sparse call")
    p.add_argument("--tap-queries", type=int, default=None, help="--preset: SpecDiff's tap_queries (default: its default)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="pixels; VAE /2 and patch 2: (size/4)^2 image tokens")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.host_overhead:
        rows = []
        for preset in [args.preset] if args.preset else ["sd3-medium", "flux-dev"]:
            args.preset, args.ratios = preset, [0.9] if args.ratios == [0.5, 0.8, 0.9, 0.95] else args.ratios
            preset_rows = measure_host_overhead(args)
            print(host_table(preset_rows, args) + "\n")
            rows += [dict(r, preset=preset) for r in preset_rows]
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
        return rows
    if args.preset is not None:
        args.ratios = args.ratios if args.ratios != [0.5, 0.8, 0.9, 0.95] else [0.5, 0.9]
        rows = measure_calls(args)
        print(calls_table(rows, args))
        parts = []
        sparse = [r for r in rows if r["method"] == f"specdiff {max(args.ratios):g} tapped"]
        both = [r for r in rows if r["method"] == f"specdiff {max(args.ratios):g} tapped, both CFG halves"]
        if args.parts and sparse:
            parts = measure_parts(args, sparse[0]["ms_wall"] / 1000, max(args.ratios),
                                  both[0]["ms_wall"] / 1000 if both else None)
            print(f"\nthe engine's extras of a sparse call at cache ratio {max(args.ratios):g}, each timed alone "
                  f"(median of 20, x {args.blocks} layers):\n\n| part | ms / layer | share of its tapped sparse call |\n|---|---|---|")
            for r in parts:
                print(f"| {r['part']} | {r['ms_per_layer']:.2f} | {100 * r['share_of_sparse_call']:.1f} % |")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                            "specdiff": specdiff.__file__, "rows": rows, "parts": parts}, indent=1))
        return rows

    pipe = tiny_sd3_pipeline(width=args.width, layers=args.layers, heads=args.heads)
    pipe.set_progress_bar_config(disable=True)
    call = dict(
        prompt="a photo of a red fox in the snow", num_inference_steps=args.steps, height=args.size,
        width=args.size, guidance_scale=args.guidance, output_type="latent",
    )
    methods = {"full compute": None}
    for r in args.ratios:
        methods[f"SpecDiff {r:.2f}"] = specdiff.SpecDiffConfig(cache_ratio=r, warmup_steps=args.warmup_steps)

    def run(config):
        if config is not None:
            specdiff.enable(pipe, config)
        try:
            tic = time.perf_counter()
            pipe(**call, generator=torch.Generator().manual_seed(0))
            seconds = time.perf_counter() - tic
            summary = specdiff.summary(pipe) if config is not None else None
        finally:
            if config is not None:
                specdiff.disable(pipe)
        return seconds, summary

    flops = {}
    for name, config in methods.items():
        if config is not None:
            specdiff.enable(pipe, config)
        try:
            flops[name] = count_module_flops(lambda: pipe(**call, generator=torch.Generator().manual_seed(0)), pipe.transformer)
        finally:
            if config is not None:
                specdiff.disable(pipe)
    run(None)  # warm-up
    times = {name: [] for name in methods}
    shares = {name: [] for name in methods}
    for _ in tqdm(range(args.repeats), desc="interleaved repeats"):
        for name, config in methods.items():
            seconds, summary = run(config)
            times[name].append(seconds)
            if summary is not None:
                shares[name].append((summary.speculation_seconds / seconds, summary.scoring_seconds / seconds))

    tokens = (args.size // 4) ** 2
    print(
        f"\nSD3 transformer, random weights: width {args.width}, {args.layers} layers, {tokens} image tokens, "
        f"{args.steps} steps, CFG {args.guidance}, {torch.get_num_threads()} CPU threads, {args.repeats} repeats\n"
    )
    print("| method | s / generation (median) | wall-clock speed-up | FLOPs ratio (full / method) | speed-up / FLOPs ratio | speculation | scoring |")
    print("|---|---|---|---|---|---|---|")
    base = times["full compute"]
    rows = []
    for name in methods:
        speedup = statistics.median(b / t for b, t in zip(base, times[name]))
        flop_ratio = flops["full compute"] / flops[name]
        spec = f"{100 * statistics.median(s[0] for s in shares[name]):.1f}%" if shares[name] else "-"
        score = f"{100 * statistics.median(s[1] for s in shares[name]):.1f}%" if shares[name] else "-"
        print(
            f"| {name} | {statistics.median(times[name]):.2f} | {speedup:.2f}x | {flop_ratio:.2f}x | "
            f"{100 * speedup / flop_ratio:.0f}% | {spec} | {score} |"
        )
        rows.append({"method": name, "seconds_median": statistics.median(times[name]), "speedup": speedup,
                     "flops_ratio": flop_ratio, "efficiency": speedup / flop_ratio})
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "specdiff": specdiff.__file__, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
