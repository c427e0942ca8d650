"""Seconds per training step of the v2 embedded model at 64 px: patch 4 (256 tokens) against patch 2
(1,024 tokens) and two wider / deeper variants, untrained, random inputs, batch 16 (the model card's figures).

    python benchmarks/embedded_patch_timing.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdiff.lab.embedded.model import build_transformer
from specdiff.lab.embedded.scenes import V2

VARIANTS = {
    "patch 4, 4 layers, width 192 (chosen)": {},
    "patch 4, 6 layers, width 256": dict(num_layers=6, num_attention_heads=4),
    "patch 2, 4 layers, width 192": dict(patch_size=2),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant, after one untimed")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    b = args.batch_size
    inputs = (torch.randn(b, 3, 64, 64), torch.randn(b, V2.max_tokens, 384), torch.randn(b, 384), torch.rand(b) * 1000)
    print("| variant | parameters | s / training step (median) |\n|---|---|---|")
    for name, overrides in VARIANTS.items():
        model = build_transformer(V2, **overrides)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        seconds = []
        for _ in range(args.repeats + 1):
            tic = time.perf_counter()
            loss = model(*inputs).sample.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - tic)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {count:.1f} M | {statistics.median(seconds[1:]):.2f} |")


if __name__ == "__main__":
    main()
