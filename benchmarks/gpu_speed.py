"""Per-call speed of the engine at real model shapes (random weights): does a sparse call turn its FLOPs
cut into time? Prepared to run first time on a GPU; `--preset tiny` runs anywhere in seconds.

    python benchmarks/gpu_speed.py --preset sd3-medium --device cuda --dtype bfloat16
    python benchmarks/gpu_speed.py --preset flux-dev --device cuda --dtype bfloat16 --compile
    python benchmarks/gpu_speed.py --preset tiny                     # CPU, seconds (the CI runs this)

A bare transformer with the preset's per-block shapes (width, heads, image and text tokens, CFG batch)
and --layers blocks is called as in a generation, timestep falling. Per method: the stock call, and
SpecDiff's calls at each cache ratio (one dense call, then sparse calls, attention taps on as in a real
run, speculation off: it is the same dense call at other timesteps). Each call is timed alone (CUDA events on a GPU,
perf_counter on the CPU); medians over --repeats generations. FLOPs per call are counted in a separate
pass (torch's FlopCounterMode). Efficiency = (time ratio) / (FLOPs ratio): 1.0 means the sparse call is
exactly as much faster as it is cheaper. Peak memory: CUDA's max allocated (GPU only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

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


def build(preset: dict, layers: int, device, dtype):
    """(transformer, call(step, num_steps) -> output) with random weights and inputs."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    heads, head_dim, side, b = preset["width_heads"], preset["head_dim"], preset["image_side"], preset["batch"]
    text = torch.randn(b, preset["text_tokens"], preset["joint_dim"], device=device, dtype=dtype)
    pooled = torch.randn(b, preset["pooled_dim"], device=device, dtype=dtype)
    if preset["family"] == "sd3":
        model = SD3Transformer2DModel(
            sample_size=side * 2, patch_size=2, in_channels=preset["in_channels"], out_channels=preset["in_channels"],
            num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=preset["joint_dim"], caption_projection_dim=heads * head_dim,
            pooled_projection_dim=preset["pooled_dim"], pos_embed_max_size=max(96, side * 2),
        )
        latents = torch.randn(b, preset["in_channels"], side * 2, side * 2, device=device, dtype=dtype)

        def call(model, step, steps):
            t = torch.full((b,), 1000.0 * (1 - step / steps), device=device, dtype=dtype)
            return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                         timestep=t, return_dict=False)[0]
    else:
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=preset["in_channels"], num_layers=max(1, layers // 2),
            num_single_layers=max(1, layers - layers // 2), attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=preset["joint_dim"], pooled_projection_dim=preset["pooled_dim"],
            guidance_embeds=True, axes_dims_rope=(16, 56, 56) if head_dim == 128 else (8, 12, 12),
        )
        latents = torch.randn(b, side * side, preset["in_channels"], device=device, dtype=dtype)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        image_ids = torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3).to(device, dtype)
        text_ids = torch.zeros(preset["text_tokens"], 3, device=device, dtype=dtype)
        guidance = torch.full((b,), 3.5, device=device, dtype=dtype)

        def call(model, step, steps):
            t = torch.full((b,), 1 - step / steps, device=device, dtype=dtype)
            return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                         img_ids=image_ids, txt_ids=text_ids, guidance=guidance, return_dict=False)[0]

    return model.to(device=device, dtype=dtype).eval(), call


class CallTimer:
    """Seconds of one call: CUDA events on a GPU (the GPU's time, not the launch's), else perf_counter."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        tic = time.perf_counter()
        fn()
        return time.perf_counter() - tic


def measure(args) -> list[dict]:
    import specdiff
    from specdiff.evaluation.flops import count_module_flops

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    model, call = build(preset, args.layers, device, dtype)
    timer = CallTimer(device)
    if args.compile:
        specdiff.compile_blocks(model)
    steps = args.calls + 1  # one dense call, then the sparse ones
    rows = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up (and compilation) of the stock call
            call(model, 0, steps)
        methods = [("stock", None)] + [(f"specdiff r={r:g}", r) for r in args.ratios]
        times = {name: {"dense": [], "sparse": []} for name, _ in methods}
        peaks = {}
        for repeat in range(args.repeats + 1):  # the first round warms up every variant; not recorded
            for name, ratio in methods:  # interleaved: every method once per round
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                if ratio is None:
                    seconds = [timer(lambda s=s: call(model, s, steps)) for s in range(steps)]
                    dense, sparse = seconds, []
                else:
                    config = specdiff.SpecDiffConfig(cache_ratio=ratio, speculative_steps=0, warmup_steps=1,
                                                     reset_steps=())
                    with specdiff.accelerated(model, config, num_inference_steps=steps):
                        seconds = [timer(lambda s=s: call(model, s, steps)) for s in range(steps)]
                    dense, sparse = seconds[:1], seconds[1:]
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
                if repeat:
                    times[name]["dense"] += dense
                    times[name]["sparse"] += sparse
        flops = {"stock": count_module_flops(lambda: call(model, 0, steps), model)}
        for name, ratio in methods[1:]:
            config = specdiff.SpecDiffConfig(cache_ratio=ratio, speculative_steps=0, warmup_steps=1, reset_steps=())
            with specdiff.accelerated(model, config, num_inference_steps=steps):
                call(model, 0, steps)
                flops[name] = count_module_flops(lambda: call(model, 1, steps), model)
    stock = statistics.median(times["stock"]["dense"])
    for name, _ in methods:
        t = times[name]
        per_call = statistics.median(t["sparse"] or t["dense"])
        time_ratio, flops_ratio = stock / per_call, flops["stock"] / flops[name]
        rows.append({
            "method": name, "dense_call_ms": 1000 * statistics.median(t["dense"]),
            "sparse_call_ms": 1000 * statistics.median(t["sparse"]) if t["sparse"] else None,
            "time_ratio": time_ratio, "flops_ratio": flops_ratio, "efficiency": time_ratio / flops_ratio,
            "dense_overhead": statistics.median(t["dense"]) / stock - 1,
            "peak_memory_mib": peaks[name] / 2**20 if name in peaks else None,
            "calls_timed": len(t["sparse"] or t["dense"]),
        })
    return rows


def table(rows, meta) -> str:
    lines = [f"{meta['device_name']}, {meta['dtype']}, preset {meta['preset']} ({meta['layers']} blocks, "
             f"{meta['image_tokens']} image + {meta['text_tokens']} text tokens, batch {meta['batch']})"
             + (", blocks compiled" if meta["compile"] else ""), "",
             "| method | dense call ms | sparse call ms | time ratio | FLOPs ratio | efficiency | dense-call overhead | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sparse = f"{r['sparse_call_ms']:.2f}" if r["sparse_call_ms"] is not None else "-"
        peak = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "-"
        lines.append(f"| {r['method']} | {r['dense_call_ms']:.2f} | {sparse} | {r['time_ratio']:.2f}x | "
                     f"{r['flops_ratio']:.2f}x | {r['efficiency']:.2f} | {100 * r['dense_overhead']:+.1f}% | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd3-medium", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (per-call ratios do not depend on it)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    p.add_argument("--calls", type=int, default=4, help="sparse calls per generation")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per method (after one warm-up round)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks first")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    preset = PRESETS[args.preset]
    meta = {"preset": args.preset, "layers": args.layers, "dtype": args.dtype, "compile": args.compile,
            "device_name": torch.cuda.get_device_name(torch.device(args.device)) if torch.device(args.device).type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)", "torch": torch.__version__,
            "image_tokens": preset["image_side"] ** 2, "text_tokens": preset["text_tokens"], "batch": preset["batch"]}
    print(table(rows, meta))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
