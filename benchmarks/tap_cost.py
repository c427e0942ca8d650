"""Where the attention taps' time goes, one layer at SD3-medium's shapes (random tensors, CPU or GPU):
the logits matmul, the fp32 softmax, the sum, all heads at once or one head at a time, and the
engine's `tap_attention` itself at its device's chunk size. Medians of 10.

    python benchmarks/tap_cost.py --threads 2          # BENCHMARKS.md section 10
"""

from __future__ import annotations

import argparse

import torch

from engine_speed import median_seconds  # benchmarks/, the script's own folder
from specdiff.engine.attention import AttentionContext, tap_attention


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--text-tokens", type=int, default=333)
    p.add_argument("--active", type=int, default=410, help="image tokens run by the sparse step")
    p.add_argument("--queries", type=int, default=64, help="tap_queries")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    b, h, d, n, s = args.batch, args.heads, args.head_dim, args.image_tokens, args.image_tokens + args.text_tokens
    generator = torch.Generator().manual_seed(0)
    queries = (torch.randn(b, h, args.queries, d, generator=generator) / d**0.5).to(device, dtype)
    keys = torch.randn(b, h, s, d, generator=generator).to(device, dtype)
    active = torch.randn(b, h, args.active, d, generator=generator).to(device, dtype)
    logits = queries @ keys.transpose(-1, -2)
    weights = torch.softmax(logits.float(), -1)

    def one_head_at_a_time():
        out = torch.zeros(b, s, device=device)
        for head in range(h):
            out += torch.softmax((queries[:, head : head + 1] @ keys[:, head : head + 1].transpose(-1, -2)).float(), -1).sum(dim=(1, 2))
        return out

    ctx = AttentionContext()
    ctx.enabled, ctx.tap_queries, ctx.tap_sum = True, args.queries, torch.zeros(b, n, device=device)
    offset = torch.tensor(7919)
    rows = {
        f"logits matmul, all heads ({b * h * args.queries * s / 1e6:.1f} M numbers)": lambda: queries @ keys.transpose(-1, -2),
        "fp32 softmax of them": lambda: torch.softmax(logits.float(), -1),
        "sum over heads and queries": lambda: weights.sum(dim=(1, 2)),
        "matmul + softmax + sum, all heads at once": lambda: torch.softmax((queries @ keys.transpose(-1, -2)).float(), -1).sum(dim=(1, 2)),
        "matmul + softmax + sum, one head at a time": one_head_at_a_time,
        "the engine's tap_attention (its device's chunk size)": lambda: tap_attention(ctx, offset, active, None, keys, slice(0, n)),
    }
    with torch.inference_mode():
        print(f"one layer: batch {b}, {h} heads x {d}, {s} keys, {args.queries} tap queries, {args.dtype}, "
              f"{device} ({torch.get_num_threads()} threads)\n\n| part | ms (median of 10) |\n|---|---|")
        for name, fn in rows.items():
            print(f"| {name} | {1000 * median_seconds(fn, device):.1f} |")


if __name__ == "__main__":
    main()
