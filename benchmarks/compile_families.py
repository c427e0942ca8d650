"""Do every family's blocks compile with no graph break under the token-level methods? Per family and
method: blocks compiled with `fullgraph=True` (a graph break is an error), dynamo's eager backend (the
same tracing, no code generation), one generation on the tiny stock pipeline, compared with the same
generation uncompiled.

    python benchmarks/compile_families.py                     # every family, SpecDiff and RAS
    python benchmarks/compile_families.py --families zimage --methods ras
"""

from __future__ import annotations

import argparse
import time

import torch

import specdiff
from specdiff.lab import tiny_pipelines
from specdiff.lab.loading import TINY, call_defaults

FAMILIES = {"sd3": "tiny-sd3", "flux": "tiny-flux", "flux2": "tiny-flux2", "qwenimage": "tiny-qwenimage",
            "wan": "tiny-wan", "zimage": "tiny-zimage"}
METHODS = {"specdiff": lambda: specdiff.SpecDiffConfig(warmup_steps=2, reset_steps=(), speculative_steps=1),
           "ras": lambda: specdiff.RASConfig(cache_ratio=0.5, warmup_steps=2, reset_steps=())}


def check(family: str, method: str, steps: int = 6) -> dict:
    """One row: compiled blocks, whether they traced whole, and the largest difference to eager."""
    name = FAMILIES[family]
    extra = call_defaults(name)

    def generate(pipe):
        out = pipe(prompt="a red fox", num_inference_steps=steps, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **extra)
        return out.images if hasattr(out, "images") else out.frames

    def fresh():
        pipe = getattr(tiny_pipelines, TINY[name])()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    torch._dynamo.reset()
    with specdiff.accelerated(pipe := fresh(), METHODS[method]()):
        eager = torch.as_tensor(generate(pipe))
    pipe = fresh()
    tic = time.perf_counter()
    row = {"family": family, "method": method, "blocks": 0, "fullgraph": False, "max_difference": None, "error": None}
    try:
        row["blocks"] = specdiff.compile_blocks(pipe, backend="eager", fullgraph=True)
        with specdiff.accelerated(pipe, METHODS[method]()):
            compiled = torch.as_tensor(generate(pipe))
        row["fullgraph"] = True
        row["max_difference"] = float((compiled - eager).abs().max())
    except Exception as error:  # a graph break under fullgraph, reported as the row's result
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    finally:
        torch._dynamo.reset()
    row["seconds"] = time.perf_counter() - tic
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = p.parse_args(argv)
    rows = [check(family, method) for family in args.families for method in args.methods]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tiny stock pipelines, 6 steps, dynamo's eager "
          "backend, fullgraph=True")
    print()
    print("| family | method | blocks compiled | traced whole (no graph break) | max difference to eager | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        result = "yes" if r["fullgraph"] else f"no: {r['error']}"
        difference = "-" if r["max_difference"] is None else f"{r['max_difference']:.1e}"
        print(f"| {r['family']} | {r['method']} | {r['blocks']} | {result} | {difference} | {r['seconds']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
