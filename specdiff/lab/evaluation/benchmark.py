"""The benchmark: every method's speed and quality, measured side by side in one run.

    specdiff bench --methods full specdiff:cache_ratio=0.9 ras fora --num-prompts 32
    torchrun --nproc-per-node 2 -m specdiff.lab.evaluation.benchmark --model tiny-sd3 ...   # sharded

For each batch of prompts every method runs in turn (interleaved, same seed),
so the wall-clock ratio to full compute is measured within the same stretch
of time. Writes results.json (every measurement), results.md (the table),
pareto.png and grid.png under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from specdiff.engine.runtime import config_fields

import numpy as np
import torch
from tqdm.auto import tqdm

from specdiff.engine.policy import ConfigError
from specdiff.lab.evaluation.methods import FULL, MethodSpec, parse_method
from specdiff.lab.evaluation.bench_args import build_parser
from specdiff.lab.evaluation.report import image_grid, markdown_table, pareto_plot, save_images, strict_json


class PeakMemory:
    """Peak memory while a block runs: max allocated on CUDA, sampled RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        process = psutil.Process()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                self._stop.wait(0.01)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def load_bench_pipeline(model: str, device: str):
    """(pipeline, call defaults) of a model name or folder, by the one loader (specdiff.lab.loading)."""
    from specdiff.lab.loading import call_defaults, load_pipeline

    pipe, _ = load_pipeline(model, device, "float32")
    return pipe, call_defaults(model)


def read_prompt_file(path: str, count: int, needed_for: str = "--num-prompts asks for") -> list[str]:
    """The first `count` non-empty lines of a text file (one prompt per line)."""
    from specdiff.configs import read_text_file

    lines = [line.strip() for line in read_text_file(path, "--prompts").splitlines()]
    prompts = [line for line in lines if line]
    if len(prompts) < count:
        raise ConfigError(f"--prompts {path!r} has {len(prompts)} prompts; {needed_for} {count}")
    return prompts[:count]


def bench_prompts(pipe, split: str, count: int, prompt_file: str | None = None):
    """(captions, scenes or None). A user's prompt file (scenes when every line parses as a scene
    caption); else scene prompts for the embedded model (the checker can read those back), else a fixed list."""
    from specdiff.lab.embedded.pipeline import ScenePipeline
    from specdiff.lab.embedded.scenes import held_out_prompts, parse_caption, training_prompts

    if prompt_file is not None:
        prompts = read_prompt_file(prompt_file, count)
        if not isinstance(pipe, ScenePipeline):
            return prompts, None
        parsed = [parse_caption(p) for p in prompts]
        if any(p is None for p in parsed):
            bad = next(p for p, sc in zip(prompts, parsed) if sc is None)
            print(f"bench: alignment left out: {prompt_file} has lines that are not scene captions, e.g. {bad!r}")
            return prompts, None
        return prompts, parsed
    if isinstance(pipe, ScenePipeline):
        style = pipe.style
        scenes = held_out_prompts(count, style=style) if split == "heldout" else training_prompts(count, style=style)
        return [s.caption() for s in scenes], scenes
    base = ["a red fox in the snow", "a city street at night", "a bowl of fruit on a table", "a sailing boat at sea"]
    return [base[i % len(base)] + ("" if i < len(base) else f", view {i}") for i in range(count)], None


def as_images(result) -> torch.Tensor:
    """(B, C, H, W) images of a pipeline's output; a video's frames side by side, (B, C, H, F * W), so
    that every metric and the grid read the whole clip."""
    if hasattr(result, "images"):
        return result.images
    frames = result.frames  # (B, F, C, H, W)
    return frames.permute(0, 2, 3, 1, 4).flatten(3)


def generate_images(pipe, prompts, seeds, steps, extra, device):
    """One generation per prompt, each with its own seeded generator (so sharding cannot change it)."""
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    images = as_images(pipe(prompt=prompts, num_inference_steps=steps, generator=generator, output_type="pt", **extra))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images.float().cpu(), time.perf_counter() - tic


def _flops(pipe, spec: MethodSpec, prompt: str, seed: int, steps: int, extra) -> int:
    from specdiff.lab.evaluation.flops import count_module_flops

    steps = spec.steps or steps
    with spec.active(pipe):
        return count_module_flops(
            lambda: pipe(prompt=[prompt], num_inference_steps=steps, generator=[torch.Generator().manual_seed(seed)],
                         output_type="latent", **extra),
            pipe.transformer,
        )


def run_shard(pipe, methods, prompts, indices, seed, steps, batch_size, extra, device, show_progress=True):
    """Generate prompts[indices] with every method, interleaved per batch. Returns per-batch records."""
    records = []
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    bar = tqdm(total=len(batches) * len(methods), desc="benchmark", disable=not show_progress)
    for batch in batches:
        texts = [prompts[i] for i in batch]
        for spec in methods:
            with spec.active(pipe) as get_summary:
                with PeakMemory(device) as memory:
                    images, seconds = generate_images(pipe, texts, [seed + i for i in batch], spec.steps or steps, extra, device)
                summary = get_summary() if get_summary is not None else None
            records.append({
                "method": spec.label, "prompt_indices": list(batch), "seconds": seconds,
                "seconds_per_image": seconds / len(batch), "peak_memory_bytes": int(memory.peak),
                "speculation_seconds": summary.speculation_seconds if summary else 0.0,
                "scoring_seconds": summary.scoring_seconds if summary else 0.0,
                "images": images.numpy(),
            })
            bar.update(1)
    bar.close()
    return records


def summarise(methods, records, prompts, scenes, flops, checker=None, clip=None, fid=None, style=None):
    """Per-method medians, ratios to full compute, fidelity and quality."""
    from specdiff.lab.evaluation.metrics import frechet_distance, psnr, ssim

    by_method = {m.label: [r for r in records if r["method"] == m.label] for m in methods}
    full_by_batch = {tuple(r["prompt_indices"]): r for r in by_method[FULL]}
    full_images = {}
    for r in by_method[FULL]:
        for k, i in enumerate(r["prompt_indices"]):
            full_images[i] = r["images"][k]
    real_features = None
    if checker is not None and scenes is not None:
        from specdiff.lab.embedded.checker import checker_features, render_batch
        import random

        real = render_batch(scenes, random.Random(0), style=style)
        real_features = checker_features(checker, real)
    full_features = {}  # features of full compute's images, extracted once per metric and prompt set

    def features_of_full(name, extract, order):
        key = (name, tuple(order))
        if key not in full_features:
            full_features[key] = extract(torch.from_numpy(np.stack([full_images[i] for i in order])))
        return full_features[key]

    rows = []
    for spec in methods:
        rs = by_method[spec.label]
        ratios = [full_by_batch[tuple(r["prompt_indices"])]["seconds"] / r["seconds"] for r in rs]
        per_prompt = {}
        for r in rs:
            for k, i in enumerate(r["prompt_indices"]):
                per_prompt[i] = r["images"][k]
        order = sorted(per_prompt)
        psnrs = [psnr(torch.from_numpy(full_images[i]), torch.from_numpy(per_prompt[i])) for i in order]
        ssims = [ssim(torch.from_numpy(full_images[i]), torch.from_numpy(per_prompt[i])) for i in order]
        finite = [p for p in psnrs if np.isfinite(p)]
        row = {
            "method": spec.label,
            "config": config_fields(spec.config) if spec.config is not None else (
                {"peer": spec.peer[0], **spec.peer[1]} if spec.peer else {}),
            "images": len(order),
            "seconds_per_image_median": statistics.median(r["seconds_per_image"] for r in rs),
            "speedup_wallclock_median": statistics.median(ratios),
            "flops_per_image": flops[spec.label],
            "flops_ratio": flops[FULL] / flops[spec.label],
            "peak_memory_mb_max": max(r["peak_memory_bytes"] for r in rs) / 2**20,
            "speculation_share": sum(r["speculation_seconds"] for r in rs) / sum(r["seconds"] for r in rs),
            "scoring_share": sum(r["scoring_seconds"] for r in rs) / sum(r["seconds"] for r in rs),
            "psnr_mean": float(np.mean(finite)) if finite else float("inf"),
            "ssim_mean": float(np.mean(ssims)),
        }
        generated = torch.from_numpy(np.stack([per_prompt[i] for i in order]))
        # a covariance needs two images; thousands make a Fréchet distance stable
        if fid is not None and len(order) >= 2:
            extractor, real_images = fid  # without real images: against full compute's images
            reference = real_images if real_images is not None else features_of_full("fid", extractor.features, order)
            row["fid"] = frechet_distance(extractor.features(generated), reference)
        if clip is not None:
            row["clip_score"] = float(np.mean(clip.score(generated, [prompts[i] for i in order])))
            if len(order) >= 2:
                reference = features_of_full("clip", clip.features, order)
                row["clip_fd_to_full"] = frechet_distance(clip.features(generated), reference)
        if real_features is not None:
            from specdiff.lab.embedded.alignment import chance_level, lenient_accuracy, strict_accuracy
            from specdiff.lab.embedded.checker import checker_features, read_images

            asked = [scenes[i] for i in order]
            seen = read_images(checker, generated)
            row.update({f"align_{k}": v for k, v in strict_accuracy(asked, seen).items()})
            row["align_lenient_mean"] = lenient_accuracy(asked, seen)["mean"]
            if len(order) >= 2:
                row["align_chance_exact_scene"] = chance_level(asked, seen)["exact_scene"]
                row["align_chance_lenient_mean"] = lenient_accuracy(asked, seen[1:] + seen[:1])["mean"]
            row["frechet_distance"] = frechet_distance(checker_features(checker, generated), real_features[order])
        rows.append(row)
    return rows


@contextlib.contextmanager
def library_messages(prefixes=("cache_dit", "CACHE_DIT", "diffusers")):
    """Hold back other libraries' log lines (cache-dit's "Acceleration hooks is disabled" reads like a
    failure) while a block runs; yields {(logger, message): count} to report once at the end."""
    import collections
    import logging

    counts: collections.Counter = collections.Counter()

    class Collect(logging.Handler):
        def emit(self, record):
            counts[(record.name.split(".")[0], record.getMessage().strip().splitlines()[0][:200])] += 1

    handler, saved = Collect(level=logging.INFO), []
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in prefixes]
    for name in names + [p for p in prefixes if p not in names]:  # cache-dit gives each module its own handler
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    try:
        yield counts
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate


def _native_scene_size(pipe, extra: dict) -> bool:
    size = pipe.style.image_size
    return extra.get("height", size) == size and extra.get("width", size) == size


def run_benchmark(args, check_size=None) -> list[dict]:
    import torch.distributed as dist

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        rank, world = 0, 1
    methods = [MethodSpec(FULL, None)] + [parse_method(m) for m in args.methods if m != FULL]
    clip = None
    if args.clip_model is not None and rank == 0:  # before any generation: a missing model fails fast
        from specdiff.lab.evaluation.clip_score import ClipScorer

        clip = ClipScorer(args.clip_model, device)
    if args.fid_reference is not None and args.fid_inception is None:
        raise ConfigError("--fid-reference needs --fid-inception (the network that reads the images)")
    fid = None
    if args.fid_inception is not None and rank == 0:
        from specdiff.lab.evaluation.fid import InceptionFeatures, folder_features

        extractor = InceptionFeatures(args.fid_inception, device)
        fid = (extractor, folder_features(extractor, args.fid_reference) if args.fid_reference else None)
    say = print if rank == 0 else (lambda *a, **k: None)
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    say(f"bench: loading {args.model} (torch threads: {torch.get_num_threads()})")
    pipe, extra = load_bench_pipeline(args.model, str(device))
    pipe.set_progress_bar_config(disable=True)
    if check_size is not None:
        check_size(pipe, args.height, args.width)
    from specdiff.lab.evaluation.peers import check_peer

    for spec in methods:
        if spec.peer is not None:
            try:
                check_peer(pipe, spec.peer[0])
            except ValueError as error:
                raise ConfigError(f"{spec.label}: {error}") from None
    if args.guidance is not None:
        extra["guidance_scale"] = args.guidance
    for side in ("height", "width"):
        if getattr(args, side) is not None:
            extra[side] = getattr(args, side)
    prompts, scenes = bench_prompts(pipe, args.split, args.num_prompts, args.prompts)
    checker_reads = scenes is not None and _native_scene_size(pipe, extra)
    if scenes is not None and not checker_reads and rank == 0:
        size = pipe.style.image_size
        print(f"bench: the checker reads {size} x {size} scenes only: alignment and Fréchet distance are left out at this size")
    shard = list(range(rank, len(prompts), world))  # every prompt exactly once over the ranks
    say(f"bench: warm-up, then {len(prompts)} prompts x {len(methods)} methods, interleaved per batch")
    with library_messages() as messages:
        generate_images(pipe, prompts[:1], [args.seed], 2, extra, device)  # warm-up
        records = run_shard(pipe, methods, prompts, shard, args.seed, args.steps, args.batch_size, extra, device,
                            show_progress=rank == 0)
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
        # every rank leaves the group here, together: a rank tearing down while another still holds the
        # group aborted it once (gloo, SIGABRT); rank 0 needs no group for the scoring that follows
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return []
    flops = {}
    with library_messages() as more_messages:
        for m in tqdm(methods, desc="FLOPs (one counted generation per method)"):
            flops[m.label] = _flops(pipe, m, prompts[0], args.seed, args.steps, extra)
    messages.update(more_messages)
    say("bench: scoring quality (PSNR / SSIM" + (", alignment, Fréchet distance" if checker_reads else "")
        + (", CLIP" if clip else "") + (", FID" if fid else "") + ")")
    checker = None
    if checker_reads:
        from specdiff.lab.embedded.checker import load_checker

        checker = load_checker(pipe.style)
    rows = summarise(methods, records, prompts, scenes, flops, checker, clip, fid,
                     style=pipe.style if scenes is not None else None)
    final = Path(args.out)
    final.mkdir(parents=True, exist_ok=True)
    # Everything is written to a temporary folder beside it, then moved in with results.json last: an
    # interrupted run never leaves a results.json that looks finished (nor one from an older run beside new plots).
    out = Path(tempfile.mkdtemp(prefix=".partial-", dir=final))
    try:
        (final / "results.json").unlink(missing_ok=True)
        meta = {
            "command": "specdiff bench " + " ".join(args.argv), "model": args.model, "steps": args.steps,
            "split": args.split, "prompts": len(prompts), "seed": args.seed, "processes": world,
            "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "height": extra.get("height"), "width": extra.get("width"),
            "alignment": ("strict: exact_scene = background and every named attribute right, nothing unasked drawn; "
                          "align_chance_* = the same score against another prompt's scene") if checker_reads else None,
            "fid_reference": (args.fid_reference or "full-compute images") if args.fid_inception else None,
            "library_messages": {f"{logger}: {text}": count for (logger, text), count in sorted(messages.items())},
        }
        per_prompt = [{k: v for k, v in r.items() if k != "images"} for r in records]
        table = markdown_table(rows)
        legend = ", ".join(f"{i}: {m.label}" for i, m in enumerate(methods))
        (out / "results.md").write_text(f"{table}\n\ngrid.png columns: {legend}\n\n{json.dumps(meta)}\n")
        pareto_plot(rows, out / "pareto.png")
        image_grid(methods, records, prompts, out / "grid.png")
        if args.save_images:
            save_images(methods, records, out / "images")
        document = strict_json({"meta": meta, "summary": rows, "batches": per_prompt})
        (out / "results.json").write_text(json.dumps(document, indent=1, allow_nan=False))
        for name in sorted(os.listdir(out), key=lambda n: n == "results.json"):  # results.json last
            if (final / name).is_dir():
                shutil.rmtree(final / name)
            os.replace(out / name, final / name)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(table)
    if messages:
        print(f"bench: {sum(messages.values())} log messages of other libraries were held back "
              f"({len(messages)} distinct, e.g. {next(iter(messages))[1][:80]!r}); they are in results.json "
              "meta.library_messages")
    written = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in final.iterdir() if not p.name.startswith(".")))
    print(f"bench: results in {final}: {written}")
    return rows


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter)).parse_args(argv)
    args.argv = argv
    run_benchmark(args)


if __name__ == "__main__":
    main()
