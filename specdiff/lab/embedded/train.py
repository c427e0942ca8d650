"""Train the embedded model (rectified flow, as in SD3), seeded and resumable.

    python -m specdiff.lab.embedded.train --out runs/scene-model --steps 10000
    python -m specdiff.lab.embedded.train --style v2 --out runs/scene-v2 --init-from specdiff/lab/embedded/weights

Every `--save-every` steps it writes a checkpoint (weights, EMA weights,
optimizer, RNG states, loss log) under --out; rerunning the same command
continues from the latest one. `--export DIR` writes the EMA weights as a
diffusers folder (see specdiff.lab.embedded.pipeline). Without the run folder
(it is not committed), `--init-from specdiff/lab/embedded/weights` continues
from the shipped weights with a fresh optimizer.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from specdiff.lab.embedded.model import build_transformer, transformer_config
from specdiff.lab.embedded.scenes import get_style, make_batch
from specdiff.lab.embedded.text_encoder import SceneTextEncoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, loss log)")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--object-weight", type=float, default=4.0, help="extra loss weight on object pixels")
    p.add_argument("--object-margin", type=int, default=0, metavar="PX",
                   help="give the extra weight also to pixels within PX of an object (its edge, a ring's hole), "
                        "where a blob and the asked shape differ")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--style", default="v1", choices=("v1", "v2"), help="scene data (see specdiff.lab.embedded.scenes)")
    p.add_argument("--device", default="cpu", help="cpu or cuda; checkpoints are always written on the CPU")
    p.add_argument("--export", type=Path, default=None, help="write the EMA weights of --out's checkpoint here and exit")
    p.add_argument("--loss-summary", type=Path, default=None,
                   help="print 100-step means and seconds per step of a loss.csv and exit")
    p.add_argument("--lr-decay", default="none", choices=("none", "cosine"),
                   help="cosine: the learning rate falls to 0 from --decay-start to --steps (or to the end of --minutes)")
    p.add_argument("--decay-start", type=int, default=0, help="step where the cosine decay begins")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop after this many minutes of this invocation (checkpoint written); with --lr-decay "
                        "cosine the decay runs over the time left, so a run ends decayed whatever the device's speed")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the style's, 4)")
    p.add_argument("--heads", type=int, default=None, help="attention heads of 64 channels (default: the style's, 3)")
    p.add_argument("--workers", type=int, default=0,
                   help="render batches in this many processes; each batch is then seeded by its step, so the data "
                        "is the same for any worker count (0: one stream in this process, as before)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: autocast the transformer's forward (weights, optimizer and EMA stay fp32)")
    p.add_argument("--text-encoder", type=Path, default=None, metavar="DIR",
                   help="MiniLM folder (default: the package's); a compact one (python -m "
                        "specdiff.lab.embedded.text_encoder --export-compact DIR) on a machine without the package")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start a new run from a model folder's weights (e.g. the shipped one) with a fresh optimizer; "
                        "a v1 (32 px, patch 2) folder also starts a v2 run, its patch layers spread over 4 x 4; "
                        "with --layers above the folder's, the new blocks start as copies whose output gates are "
                        "zero, so the deeper model starts computing the same function")
    return p.parse_args(argv)


def check_args(args) -> None:
    """One-line errors for numbers out of range, before any work."""
    for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 1), ("save_every", 1), ("layers", 1), ("heads", 1),
                      ("workers", 0), ("decay_start", 0), ("object_margin", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise SystemExit(f"train: error: --{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.minutes is not None and not args.minutes > 0:
        raise SystemExit(f"train: error: --minutes must be > 0, got {args.minutes}")
    if args.lr_decay == "cosine" and args.decay_start >= args.steps:
        raise SystemExit(f"train: error: --decay-start ({args.decay_start}) must be below --steps ({args.steps})")
    if args.init_from is not None and args.heads is not None:
        raise SystemExit("train: error: --init-from takes the width of the weights it starts from; drop --heads")


def last_logged_seconds(log_path: Path) -> float:
    """The `seconds` column of a loss log's last row (0 for a log with no rows)."""
    rows = log_path.read_text().splitlines()[1:]
    return float(rows[-1].split(",")[2]) if rows else 0.0


def learning_rate(args, step: int, time_used: float) -> float:
    """Warm-up, then constant or a cosine decay to 0 over the steps (or, with --minutes, the time) left."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.lr_decay == "cosine" and step >= args.decay_start:
        progress = (step - args.decay_start) / max(1, args.steps - args.decay_start)
        if args.minutes is not None:
            progress = max(progress, time_used / (60 * args.minutes))
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr


def model_overrides(args) -> dict:
    overrides = {}
    if args.layers is not None:
        overrides["num_layers"] = args.layers
    if args.heads is not None:
        overrides["num_attention_heads"] = args.heads
    return overrides


class SceneBatches(torch.utils.data.IterableDataset):
    """Rendered training batches from `start` on, batch k drawn from its own seed (f"{seed}:{k}"): the same data
    for any number of worker processes, and a resumed run continues the stream from its step."""

    def __init__(self, style, batch_size: int, seed: int, start: int):
        self.style, self.batch_size, self.seed, self.start = style, batch_size, seed, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start + worker
        while True:  # the DataLoader takes the workers' outputs in turn, so batches arrive in step order
            rng = random.Random(f"{self.seed}:{step}")
            images, masks, captions, _ = make_batch(rng, self.batch_size, style=self.style)
            yield torch.from_numpy(images).float(), torch.from_numpy(masks).float(), captions
            step += workers


def batch_stream(args, style, data_rng: random.Random, step: int, device: torch.device):
    """(images, masks, captions) per step: one seeded stream in this process, or --workers processes."""
    if args.workers <= 0:
        while True:
            images, masks, captions, _ = make_batch(data_rng, args.batch_size, style=style)
            yield torch.from_numpy(images), torch.from_numpy(masks), captions
    loader = torch.utils.data.DataLoader(
        SceneBatches(style, args.batch_size, args.seed, step), batch_size=None, num_workers=args.workers,
        prefetch_factor=4, pin_memory=device.type == "cuda")
    yield from loader


def loss_weight(masks: torch.Tensor, object_weight: float, margin: int) -> torch.Tensor:
    """(B, S, S) object masks -> (B, 1, S, S) per-pixel loss weights: 1 + object_weight on objects and their margin."""
    region = masks.float().unsqueeze(1)
    if margin:
        region = F.max_pool2d(region, 2 * margin + 1, stride=1, padding=margin)
    return 1.0 + object_weight * region


def logit_normal(batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(torch.randn(batch, generator=generator))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.loss_summary is not None:
        summarise_loss(args.loss_summary)
        return
    if args.export is not None:
        export_checkpoint(args.out / "checkpoint.pt", args.export)
        return
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train: error: --device cuda, but this torch has no CUDA device")
    style = get_style(args.style)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "checkpoint.pt"

    torch.manual_seed(args.seed)
    overrides = model_overrides(args)
    state = torch.load(ckpt_path, weights_only=True, map_location="cpu") if ckpt_path.exists() else None
    if state is not None:  # a resumed run keeps the size it was started with
        if overrides and overrides != state.get("overrides", {}):
            raise SystemExit(f"train: error: --layers / --heads {overrides} differ from the run in {args.out} "
                             f"({state.get('overrides', {})})")
        overrides = state.get("overrides", {})
    model = build_transformer(style, **overrides)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    data_rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        data_rng.setstate(state["data_rng"])
        gen.set_state(state["gen"])
        step = state["step"]
        print(f"resumed at step {step}")
    elif args.init_from is not None:
        from diffusers import SD3Transformer2DModel

        start = SD3Transformer2DModel.from_pretrained(args.init_from / "transformer", local_files_only=True,
                                                      use_safetensors=True, torch_dtype=torch.float32)
        if args.layers is not None and args.layers < start.config.num_layers:
            raise SystemExit(f"train: error: --layers {args.layers} is below the {start.config.num_layers} blocks "
                             f"of {args.init_from}; --init-from can only add blocks")
        weights = adapt_patch_size(start.state_dict(), start.config.patch_size, model.config.patch_size)
        weights = grow_depth(weights, start.config.num_layers, model.config.num_layers)
        model.load_state_dict(weights)
        ema.load_state_dict(weights)
        print(f"starting from the weights in {args.init_from}")
    resumed, state = state is not None, None  # the checkpoint's tensors are not kept through training
    model.to(device)
    ema.to(device)
    if resumed:  # the optimizer state was loaded on the CPU
        for value in opt.state.values():
            for key, tensor in value.items():
                if torch.is_tensor(tensor) and key != "step":
                    value[key] = tensor.to(device)
    encoder = SceneTextEncoder(max_tokens=style.max_tokens, path=args.text_encoder).to(device)
    empty_tokens, empty_pooled = encoder([""])

    log_path = args.out / "loss.csv"
    new_log = not log_path.exists() or step == 0
    log = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "loss", "seconds"])
    (args.out / "args.json").write_text(json.dumps(
        {**vars(args), "config": transformer_config(style, **overrides)}, indent=1, default=str))

    model.train()
    started = time.time() - (0.0 if new_log else last_logged_seconds(log_path))  # a resumed run keeps counting
    invoked = time.time()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    batches = batch_stream(args, style, data_rng, step, device)
    bar = tqdm(total=args.steps, initial=step, desc="training", smoothing=0.05)
    while step < args.steps:
        time_used = time.time() - invoked
        if args.minutes is not None and time_used >= 60 * args.minutes:
            break
        images, masks, captions = next(batches)
        x0 = images.to(device, non_blocking=True)
        weight = loss_weight(masks.to(device, non_blocking=True), args.object_weight, args.object_margin)
        tokens, pooled = encoder(captions)
        # Random draws stay on the CPU generator (same numbers on any device), then move.
        drop = (torch.rand(args.batch_size, generator=gen) < args.caption_dropout).to(device)
        tokens = torch.where(drop[:, None, None], empty_tokens, tokens)
        pooled = torch.where(drop[:, None], empty_pooled, pooled)

        t = logit_normal(args.batch_size, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        target = noise - x0
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, step, time_used)
        with autocast:
            pred = model(xt, tokens, pooled, t * 1000).sample
        loss = (weight * (pred.float() - target) ** 2).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        loss_value = loss.item()
        writer.writerow([step, f"{loss_value:.5f}", f"{time.time() - started:.1f}"])
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % args.save_every == 0 or step == args.steps:
            log.flush()
            save_checkpoint(ckpt_path, model, ema, opt, data_rng, gen, step, style, overrides)
    if step % args.save_every and step != args.steps:  # stopped by --minutes between saves
        log.flush()
        save_checkpoint(ckpt_path, model, ema, opt, data_rng, gen, step, style, overrides)
    bar.close()
    log.close()


def save_checkpoint(path: Path, model, ema, opt, data_rng, gen, step: int, style, overrides: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": _to_cpu(model.state_dict()), "ema": _to_cpu(ema.state_dict()),
         "opt": _to_cpu(opt.state_dict()), "data_rng": data_rng.getstate(), "gen": gen.get_state(),
         "step": step, "style": style.name, "overrides": overrides},
        tmp,
    )
    os.replace(tmp, path)  # never a half-written checkpoint


def _to_cpu(tree):
    if torch.is_tensor(tree):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_cpu(v) for v in tree]
    return tree


def adapt_patch_size(weights: dict, old: int, new: int) -> dict:
    """Weights of a patch-`old` model for a patch-`new` one (new a multiple of old) that computes the same
    function on images upsampled by new / old: each old pixel's patch weights spread over its block."""
    if old == new:
        return weights
    if new % old:
        raise ValueError(f"cannot start a patch-{new} model from patch-{old} weights")
    k = new // old
    out = dict(weights)
    conv = weights["pos_embed.proj.weight"]  # (width, channels, old, old)
    out["pos_embed.proj.weight"] = conv.repeat_interleave(k, 2).repeat_interleave(k, 3) / (k * k)
    # proj_out rows are ordered (p, q, channel); row (p, q, c) of the new model copies (p // k, q // k, c).
    channels = weights["proj_out.weight"].shape[0] // (old * old)
    p, q, c = torch.meshgrid(torch.arange(new), torch.arange(new), torch.arange(channels), indexing="ij")
    source = (((p // k) * old + q // k) * channels + c).flatten()
    out["proj_out.weight"] = weights["proj_out.weight"][source]
    out["proj_out.bias"] = weights["proj_out.bias"][source]
    return out


def grow_depth(weights: dict, old: int, new: int) -> dict:
    """Weights of an `old`-block SD3 transformer for a `new`-block one that computes the same function.

    The last block (no text output) stays last; the others spread evenly over the new non-last places and
    each gap gets a copy of the block before it with its output gates (attention and MLP, image and text)
    zeroed, which makes the block an identity until training opens the gates.
    """
    if new == old:
        return weights
    if old < 2:
        raise ValueError("growing needs a model with at least one block besides the last")
    prefix = "transformer_blocks."
    blocks = [{k[len(f"{prefix}{i}."):]: v for k, v in weights.items() if k.startswith(f"{prefix}{i}.")}
              for i in range(old)]
    placed = {round(j * (new - 1) / (old - 1)): j for j in range(old - 1)}
    grown = []
    for position in range(new - 1):
        if position in placed:
            grown.append(blocks[placed[position]])
            continue
        copy = {k: v.clone() for k, v in blocks[placed[max(p for p in placed if p < position)]].items()}
        for norm in ("norm1.linear", "norm1_context.linear"):
            for part in ("weight", "bias"):
                tensor = copy[f"{norm}.{part}"]  # rows: shift, scale, gate of attention, then of the MLP
                width = tensor.shape[0] // 6
                tensor[2 * width : 3 * width] = 0
                tensor[5 * width :] = 0
        grown.append(copy)
    grown.append(blocks[-1])
    out = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    for i, block in enumerate(grown):
        out.update({f"{prefix}{i}.{k}": v for k, v in block.items()})
    return out


def summarise_loss(log: Path, window: int = 100) -> None:
    """The loss-curve figures quoted in the model card."""
    rows = list(csv.DictReader(open(log)))
    loss = [float(r["loss"]) for r in rows]
    for start in (0, 1000, 2000, 4000, 6000, len(rows) - window):
        if 0 <= start < len(rows):
            segment = loss[start : start + window]
            print(f"steps {start + 1}-{start + len(segment)}: mean loss {sum(segment) / len(segment):.3f}")
    seconds = [float(r["seconds"]) for r in rows]
    print(f"{len(rows)} steps in {seconds[-1]:.0f} s; last 1000 steps at "
          f"{(seconds[-1] - seconds[-1001]) / 1000:.2f} s per step" if len(rows) > 1000 else f"{len(rows)} steps")


def plot_loss(log: Path, path: Path, window: int = 100) -> None:
    """The loss curve (raw and a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(log)))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, alpha=0.25, lw=0.5, label="loss")
    ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted velocity MSE")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export_checkpoint(checkpoint: Path, folder: Path) -> None:
    """EMA weights -> diffusers folder, with the loss log and its plot beside them."""
    import shutil

    from specdiff.lab.embedded.pipeline import export_pipeline, write_checksums

    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    style = get_style(state.get("style", "v1"))
    model = build_transformer(style, **state.get("overrides", {}))
    model.load_state_dict(state["ema"])
    export_pipeline(model, folder, style=style)
    log = checkpoint.parent / "loss.csv"
    if log.exists():
        (folder / "training").mkdir(exist_ok=True)
        rows = log.read_text().splitlines()
        # the log can run ahead of the last checkpoint, and need not start at step 1
        kept = rows[:1] + [row for row in rows[1:] if int(row.split(",", 1)[0]) <= state["step"]]
        (folder / "training" / "loss.csv").write_text("\n".join(kept) + "\n")
        plot_loss(folder / "training" / "loss.csv", folder / "training" / "loss.png")
        shutil.copy(checkpoint.parent / "args.json", folder / "training" / "args.json")
        write_checksums(folder)
    print(f"exported the EMA weights of step {state['step']} to {folder}")


if __name__ == "__main__":
    main()
