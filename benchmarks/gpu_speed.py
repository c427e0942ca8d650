"""Whole generations through the stock pipelines at real model sizes (random weights): stock diffusers,
full compute through the engine, SpecDiff's defaults, RAS 0.9, FORA, ToCa, TaylorSeer. For a GPU.

    python benchmarks/gpu_speed.py --out benchmarks/results/gpu-h100          # SD3-medium and FLUX.1-dev
    python benchmarks/gpu_speed.py --models sd3-medium --blocks 4             # fewer blocks (memory, time)
    python benchmarks/gpu_speed.py --tiny                                     # the same code path on the CPU
    python benchmarks/gpu_speed.py --methods stock stock+compile specdiff specdiff+graphs fora+compile

A method name may end in "+graphs" (enable(..., cuda_graphs=True): each kind of real-pass call replayed
from a CUDA graph; on a CPU the same path without capture) and "+compile" (the blocks compiled with
specdiff.compile_blocks for this method's generations only, so eager and compiled rows share one run).
Speed-ups are given over eager stock and, when the run has a "stock+compile" row, over compiled stock.

The transformers have the real configs (SD3-medium: 24 blocks, width 1536; FLUX.1-dev: 19 double + 38
single blocks, width 3072), built directly on the device in bf16 with random weights; the text encoders
are one-layer stand-ins with the real output widths and sequence lengths (333 text tokens for SD3, 512
for FLUX), the VAE a small one with the real latent channels and 8x downsampling, so the pipeline's own
code runs at 1024 x 1024 px, 28 steps. Methods run interleaved, one generation each per round, after a
warm-up round, which also counts each method's transformer FLOPs (FlopCounterMode); each generation
timed with CUDA events; peak memory is torch.cuda.max_memory_allocated. --compile compiles the blocks
(specdiff.compile_blocks) after the FLOP count, for stock and every method alike (or per method, "+compile"); if dynamo hits its
recompile limit anywhere in the run (blocks then run eager for every method after it), every row is
marked not valid in the table, and the method during which it happened is named.
A budget guard stops adding rounds once --budget-minutes is spent (at least one timed round). Prints one
JSON line per method and a Markdown table; --out also writes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from specdiff.lab.evaluation.flops import count_module_flops

METHODS = ["stock", "full", "specdiff", "ras:cache_ratio=0.9", "fora", "toca", "taylorseer"]

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                         shift_factor=0.0, scaling_factor=1.0)


def real_size_pipeline(model: str, blocks: int | None, device: str, dtype: torch.dtype):
    """The stock pipeline with the real transformer config (random weights) and light stand-in encoders."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextModel

    from specdiff.lab.tiny_pipelines import _clip_text_encoder, _clip_tokenizer, _t5_encoder, _t5_tokenizer

    torch.manual_seed(0)
    vocab = len(_clip_tokenizer())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # built where it runs: no CPU copy of billions of random weights
            if model == "sd3-medium":
                config = dict(SD3_MEDIUM, **({"num_layers": blocks} if blocks else {}))
                pipe = StableDiffusion3Pipeline(
                    transformer=SD3Transformer2DModel(**config), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                    vae=_vae(16), text_encoder=_clip_text_encoder(768, 768, vocab), tokenizer=_clip_tokenizer(),
                    text_encoder_2=_clip_text_encoder(1280, 1280, vocab), tokenizer_2=_clip_tokenizer(),
                    text_encoder_3=_t5_encoder(4096, len(_t5_tokenizer())), tokenizer_3=_t5_tokenizer())
                call = dict(height=1024, width=1024, guidance_scale=7.0, max_sequence_length=256)
            else:
                config = dict(FLUX_DEV)
                if blocks:
                    config.update(num_layers=max(1, blocks // 3), num_single_layers=max(1, blocks - blocks // 3))
                pipe = FluxPipeline(
                    transformer=FluxTransformer2DModel(**config),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15, base_image_seq_len=256,
                                                              max_image_seq_len=4096),
                    vae=_vae(16), text_encoder=CLIPTextModel(_clip_text_encoder(768, 768, vocab).config),
                    tokenizer=_clip_tokenizer(), text_encoder_2=_t5_encoder(4096, len(_t5_tokenizer())),
                    tokenizer_2=_t5_tokenizer())
                call = dict(height=1024, width=1024, guidance_scale=3.5, max_sequence_length=512)
    finally:
        torch.set_default_dtype(previous)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def tiny_pipeline(model: str):
    from specdiff.lab.tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline() if model == "sd3-medium" else tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(height=64, width=64)


class RecompileLimitWatch(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: after one, the code object that hit it runs
    eager for every call its compiled variants do not match, so a compiled timing is no longer one."""

    LOGGER = "torch._dynamo.convert_frame"

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "recompile_limit" in record.getMessage():
            self.hits += 1

    def __enter__(self) -> "RecompileLimitWatch":
        logging.getLogger(self.LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)


def _method(name: str, device: str):
    """A MethodSpec; name may end in "+graphs" and / or "+compile" (MethodSpec.compiled, set here)."""
    import dataclasses

    from specdiff.lab.evaluation.methods import MethodSpec, parse_method
    from specdiff.policies.full import FullComputeConfig

    base, *flags = name.split("+")
    unknown = set(flags) - {"graphs", "compile"}
    if unknown:
        raise SystemExit(f"--methods {name}: unknown suffix {'+'.join(sorted(unknown))} (allowed: +graphs, +compile)")
    if base == "stock":
        spec = MethodSpec("stock", None)
    elif base == "full":
        spec = MethodSpec("full (engine)", FullComputeConfig())
    else:
        spec = parse_method(base)
    if "graphs" in flags:
        if spec.config is None:
            raise SystemExit(f"--methods {name}: graphs replay the engine's calls; use full+graphs for stock-equivalent steps")
        spec = dataclasses.replace(spec, options={"cuda_graphs": True if torch.device(device).type == "cuda" else "eager"})
    spec.label = spec.label + "".join(f" +{flag}" for flag in flags)
    spec.compiled = "compile" in flags
    return spec


class CompiledBlocks:
    """Regional compilation switched per method: compiled once (specdiff.compile_blocks), then each
    generation runs with the blocks' compiled forwards on or off."""

    def __init__(self, transformer) -> None:
        import specdiff

        self.blocks = [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is None]
        specdiff.compile_blocks(transformer)
        self.compiled = {m: m._compiled_call_impl for m in self.blocks if m._compiled_call_impl is not None}
        self.use(False)

    def use(self, on: bool) -> None:
        for module, compiled in self.compiled.items():
            module._compiled_call_impl = compiled if on else None


class CallTimes:
    """Per transformer call of one generation: the host's time to issue it (no sync inside) and, on a
    GPU, its time on the GPU (CUDA events). A call whose host time reaches its GPU time is launch-bound."""

    def __init__(self, transformer, cuda: bool) -> None:
        self.cuda, self.calls, self._open = cuda, [], None
        self.handles = [transformer.register_forward_pre_hook(self._start),
                        transformer.register_forward_hook(self._end)]

    def _event(self):
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, *args):
        self._open = (time.perf_counter(), self._event())

    def _end(self, *args):
        host, start = self._open
        self.calls.append((time.perf_counter() - host, start, self._event()))

    def medians(self) -> tuple[float, float | None]:
        """(host ms, GPU ms) per call, medians; call after the generation (syncs)."""
        for handle in self.handles:
            handle.remove()
        if self.cuda:
            torch.cuda.synchronize()
        host = statistics.median(c[0] for c in self.calls) * 1000
        gpu = statistics.median(s.elapsed_time(e) for _, s, e in self.calls) if self.cuda else None
        return host, gpu


def run_model(model: str, args, deadline: float) -> list[dict]:
    import dataclasses

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.tiny:
        pipe, call = tiny_pipeline(model)
    else:
        pipe, call = real_size_pipeline(model, args.blocks, args.device, torch.bfloat16)
    call = dict(call, num_inference_steps=args.steps, output_type="latent" if args.latents else "pil")
    methods = [_method(name, args.device) for name in args.methods]
    for m in methods:
        m.compiled = m.compiled or args.compile
    compiled_blocks = None  # made after the FLOP count when any method compiles

    limit_hits = {m.label: 0 for m in methods}
    graphs = {m.label: 0 for m in methods}  # compiled by dynamo during the method's generations

    def generate(spec, count_flops: bool = False, per_call: bool = False):
        from torch._dynamo.utils import counters

        if compiled_blocks is not None:
            compiled_blocks.use(spec.compiled)
        if count_flops:  # FLOPs of the eager path: a graph replays the same kernels, uncounted
            spec = dataclasses.replace(spec, options={})
        before = counters["stats"]["unique_graphs"]
        with spec.active(pipe), RecompileLimitWatch() as watch:
            try:
                return _generate(spec, count_flops, per_call)
            finally:
                limit_hits[spec.label] += watch.hits
                graphs[spec.label] += counters["stats"]["unique_graphs"] - before

    def _generate(spec, count_flops: bool, per_call: bool):
        run = lambda: pipe("a red fox in the snow", generator=torch.Generator().manual_seed(0), **call)  # noqa: E731
        if count_flops:  # the first warm-up generation, run under the FLOP counter (it runs the same kernels)
            return count_module_flops(run, pipe.transformer)
        if per_call:
            times = CallTimes(pipe.transformer, cuda)
            run()
            return times.medians()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        tic = time.perf_counter()
        run()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000, torch.cuda.max_memory_allocated(device)
        return time.perf_counter() - tic, 0

    errors: dict[str, str] = {}  # a method that failed is reported and left out of later rounds

    def guarded(m, **options):
        if m.label in errors:
            return None
        try:
            return generate(m, **options)
        except Exception as error:  # noqa: BLE001 - one method's failure must not cost the whole run
            errors[m.label] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            print(f"{model} {m.label}: failed, left out: {errors[m.label]}", flush=True)
            return None

    times = {m.label: [] for m in methods}
    peaks = {m.label: 0 for m in methods}
    flops = {m.label: guarded(m, count_flops=True) for m in methods}  # warm-up round: first-call costs
    if any(m.compiled for m in methods):
        compiled_blocks = CompiledBlocks(pipe.transformer)
    for m in methods:  # a second warm-up round: compilation, CUDA-graph captures (a kind's second call)
        guarded(m)
    rounds = 0
    while rounds < args.rounds and (rounds == 0 or time.perf_counter() < deadline):
        for m in methods:
            result = guarded(m)
            if result is not None:
                times[m.label].append(result[0])
                peaks[m.label] = max(peaks[m.label], result[1])
        rounds += 1
    call_times = {m.label: guarded(m, per_call=True) or (None, None) for m in methods}  # one more, hooked
    if "stock" in errors or not times["stock"]:
        raise RuntimeError(f"{model}: stock failed ({errors.get('stock')}), nothing to compare with")
    medians = {label: statistics.median(t) if t else None for label, t in times.items()}
    stock = medians["stock"]
    compiled_stock = medians.get("stock +compile")
    transformer = pipe.transformer
    blocks = sum(len(getattr(transformer, n, [])) for n in ("transformer_blocks", "single_transformer_blocks"))
    rows = []
    for m in methods:
        if m.label in errors or medians[m.label] is None:
            rows.append({"model": model + (" (tiny)" if args.tiny else ""), "blocks": blocks, "method": m.label,
                         "error": errors.get(m.label, "no timed round")})
            continue
        flops_ratio = flops["stock"] / flops[m.label] if flops[m.label] else None
        rows.append({
            "model": model + (" (tiny)" if args.tiny else ""), "blocks": blocks, "method": m.label,
            "seconds_median": medians[m.label], "seconds": times[m.label],
            "speedup_vs_stock": stock / medians[m.label],
            "speedup_vs_compiled_stock": compiled_stock / medians[m.label] if compiled_stock else None,
            "transformer_flops": flops[m.label], "flops_ratio_vs_stock": flops_ratio,
            "efficiency": stock / medians[m.label] / flops_ratio if flops_ratio else None,
            "host_ms_per_call": call_times[m.label][0], "gpu_ms_per_call": call_times[m.label][1],
            "peak_memory_gib": peaks[m.label] / 2**30 if cuda else None,
            "peak_vs_stock": peaks[m.label] / peaks["stock"] if cuda and peaks["stock"] else None,
            "rounds": rounds, "steps": args.steps, "recompile_limit_hits": limit_hits[m.label],
            "graphs_compiled": graphs[m.label] if m.compiled else None,
            # after a hit the code object runs eager wherever its variants miss, for every method that follows
            "compiled_timing_valid": (sum(limit_hits.values()) == 0) if compiled_blocks is not None else None,
        })
    pipe = None  # free the model before the next one is built
    if cuda:
        torch.cuda.empty_cache()
    return rows


def table(rows, device_name: str) -> str:
    lines = [f"{device_name}; medians of interleaved rounds (CUDA events on a GPU)", "",
             "| model | blocks | method | s / image | speed-up vs stock | vs compiled stock | FLOPs ratio "
             "| efficiency | host ms / call | GPU ms / call | peak GiB | peak vs stock | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    number = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['blocks']} | {r['method']} | failed: {r['error']} |" + " |" * 9)
            continue
        fr = r["flops_ratio_vs_stock"]
        method = r["method"] + (" (recompile limit hit here)" if r.get("recompile_limit_hits") else "")
        method += " (not valid: some blocks ran eager)" if r.get("compiled_timing_valid") is False else ""
        lines.append(f"| {r['model']} | {r['blocks']} | {method} | {r['seconds_median']:.3f} | "
                     f"{r['speedup_vs_stock']:.2f}x | {number(r.get('speedup_vs_compiled_stock'), '.2f')}x | "
                     f"{number(fr, '.2f')}x | {number(r.get('efficiency'), '.0%')} | "
                     f"{number(r.get('host_ms_per_call'), '.2f')} | {number(r.get('gpu_ms_per_call'), '.2f')} | "
                     f"{number(r['peak_memory_gib'], '.2f')} | {number(r['peak_vs_stock'], '.3f')} | {r['rounds']} |")
    lines += ["", "efficiency = speed-up over eager stock / FLOPs ratio (100 %: the whole FLOPs cut turned into time); "
              "host ms / call: the host's time to issue one transformer call, GPU ms / call: its time on the GPU "
              "(medians over one more generation; a call whose host time reaches its GPU time is launch-bound); "
              "+graphs: CUDA-graph replay (on a CPU, the same path without capture); +compile: blocks compiled"]
    return "\n".join(lines).replace("-x |", "- |")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd3-medium", "flux-dev"], choices=["sd3-medium", "flux-dev"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--blocks", type=int, default=None, help="fewer blocks than the real model (memory, time)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds at most (the budget may stop earlier)")
    p.add_argument("--budget-minutes", type=float, default=8.0, help="the whole run, both models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true",
                   help="regional torch.compile of the blocks for every method (else per method: name+compile)")
    p.add_argument("--latents", action="store_true", help="stop before the VAE decode")
    p.add_argument("--tiny", action="store_true", help="tiny pipelines on the CPU: the same code path, in seconds")
    p.add_argument("--out", type=Path, default=None, help="folder for results.jsonl and results.md")
    args = p.parse_args(argv)
    if args.tiny:
        args.device, args.steps = "cpu", min(args.steps, 6)
    started = time.perf_counter()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for i, model in enumerate(args.models):
        # each model gets an equal share of what is left of the budget
        share = (args.budget_minutes * 60 - (time.perf_counter() - started)) / (len(args.models) - i)
        for row in run_model(model, args, time.perf_counter() + share):
            print(json.dumps(row))
            rows.append(row)
        text = table(rows, name + f", torch {torch.__version__}" + (", blocks compiled" if args.compile else "")
                     + f", {(time.perf_counter() - started) / 60:.1f} min")
        if args.out is not None:  # after each model: a later one running out of time loses only itself
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (args.out / "results.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
