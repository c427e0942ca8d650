"""The engine's attention taps against those of an earlier commit, one layer at SD3-medium's shapes,
alternating which goes first, in one process (so both see the same machine state).

    python benchmarks/tap_ab.py --before 40ae466 --threads 2        # BENCHMARKS.md section 12
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from specdiff.engine import attention as current


def module_at(commit: str):
    """specdiff/engine/attention.py as it was at `commit`, imported under another name."""
    source = subprocess.run(["git", "show", f"{commit}:specdiff/engine/attention.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "attention_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("attention_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="a commit whose taps to compare with this checkout's")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--active", type=int, default=410, help="image tokens run by the sparse step (cache ratio 0.9)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    before = module_at(args.before)
    batch, heads, head_dim, image, text = 2, 24, 64, 4096, 333
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(batch, heads, image + text, head_dim, generator=generator)
    active = torch.randn(batch, heads, args.active, head_dim, generator=generator)
    offset = torch.tensor(7919)

    def taps(module):
        ctx = module.AttentionContext()
        ctx.enabled, ctx.tap_queries, ctx.tap_sum = True, args.queries, torch.zeros(batch, image)
        module.tap_attention(ctx, offset, active, None, keys, slice(0, image))
        return ctx.tap_sum

    torch.testing.assert_close(taps(current), taps(before), rtol=1e-5, atol=1e-6)  # the same sums
    seconds = {"before": [], "now": []}
    with torch.inference_mode():
        for r in range(args.rounds):
            order = [("before", before), ("now", current)]
            for name, module in order if r % 2 else order[::-1]:
                tic = time.perf_counter()
                taps(module)
                seconds[name].append(time.perf_counter() - tic)
    # the current path's parts, one head at a time into reused buffers (the CPU's chunks at these shapes)
    queries = active[:, :, :: max(1, args.active // args.queries)][:, :, : args.queries] * head_dim**-0.5
    shape = (batch, 1, queries.shape[2], keys.shape[2])
    logits, weights = torch.empty(shape), torch.empty(shape)

    def matmuls():
        for head in range(heads):
            torch.matmul(queries[:, head : head + 1], keys[:, head : head + 1].transpose(-1, -2), out=logits)

    def softmaxes():
        for _ in range(heads):
            torch.ops.aten._softmax.out(logits, -1, False, out=weights)

    def sums():
        for _ in range(heads):
            weights.sum(dim=(1, 2))

    parts = {"logits matmuls": [], "fp32 softmaxes": [], "sums": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, fn in zip(parts, (matmuls, softmaxes, sums)):
                tic = time.perf_counter()
                fn()
                parts[name].append(time.perf_counter() - tic)
    result = {name: 1000 * statistics.median(values[2:]) for name, values in seconds.items()}
    result["parts"] = {name: 1000 * statistics.median(values[2:]) for name, values in parts.items()}
    print(f"one layer's taps, {args.queries} queries, {image + text} keys, {heads} heads, batch {batch}, fp32, "
          f"{torch.get_num_threads()} threads: before ({args.before}) {result['before']:.1f} ms, "
          f"now {result['now']:.1f} ms (medians of {args.rounds - 2}, alternating order); its parts, {heads} heads: "
          + ", ".join(f"{name} {ms:.1f} ms" for name, ms in result["parts"].items()))
    return result


if __name__ == "__main__":
    main()
