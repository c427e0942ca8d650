"""How many graphs dynamo compiles per method when every method runs, one after another, on one pipeline
with compiled blocks (tiny pipelines, dynamo's eager backend: the same guards, no code generation).
All methods share each block class's code object and so its recompile limit (BENCHMARKS.md section 12).

    python benchmarks/compile_variants.py --family sd3
    python benchmarks/compile_variants.py --family flux --steps 20         # the counts must not grow with steps
    python benchmarks/compile_variants.py --family sd3 --time-stock-calls  # stock's per-call time, before / after
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specdiff
from specdiff.lab.studies import POLICIES, config_for
from specdiff.lab.tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

EXTRA = [("specdiff-study", {"importance": "change"}), ("specdiff-study", {"importance": "spec-change"}),
         ("specdiff", {"tap_queries": 16}), ("ras", {"cache_ratio": 0.5})]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd3", "flux"], default="sd3")
    p.add_argument("--layers", type=int, default=3, help="SD3 blocks (the counts do not depend on it)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--static", action="store_true", help="compile with dynamic=False")
    p.add_argument("--time-stock-calls", action="store_true",
                   help="median of 200 stock transformer calls with stock's graphs only, then with all of them")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch._dynamo.reset()
    pipe = tiny_sd3_pipeline(layers=args.layers) if args.family == "sd3" else tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def generate():
        pipe("a red fox", num_inference_steps=args.steps, height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(0))

    captured = {}
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, a, kwargs: captured.setdefault("kwargs", kwargs) and None, with_kwargs=True)

    def stock_call_ms():
        with torch.inference_mode():
            times = []
            for _ in range(200):
                tic = time.perf_counter()
                pipe.transformer(**captured["kwargs"])
                times.append(time.perf_counter() - tic)
        return 1000 * statistics.median(times)

    specdiff.compile_blocks(pipe, backend=backend, recompile_limit=1000, **({"dynamic": False} if args.static else {}))
    generate()
    hook.remove()
    counts = {"stock": len(graphs)}
    timings = {"stock graphs only": stock_call_ms()} if args.time_stock_calls else {}
    for method, fields in [(m, {}) for m in POLICIES] + EXTRA:
        before = len(graphs)
        with specdiff.accelerated(pipe, config_for(method, **fields)):
            generate()
        counts[method + "".join(f" {k}={v}" for k, v in fields.items())] = len(graphs) - before
    if args.time_stock_calls:
        timings["all graphs"] = stock_call_ms()
    print(f"{args.family}, {args.steps} steps{', dynamic=False' if args.static else ''}: graphs added per method, "
          f"in this order")
    for name, count in counts.items():
        print(f"  {name}: {count}")
    print(f"  total: {len(graphs)}")
    for name, ms in timings.items():
        print(f"stock call, {name} cached: {ms:.1f} ms (median of 200, one thread)")
    return {"counts": counts, "total": len(graphs), "timings": timings}


if __name__ == "__main__":
    main()
