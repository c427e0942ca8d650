"""Where a scene model fails: strict alignment by prompt split and object count, and which shape it draws.

`specdiff bench` gives one held-out figure per method; this breaks full compute down, so that a
model's next change can aim at its real failure (memorising pairs? binding attributes to objects
in busy scenes? drawing a shape at all?):

    python -m specdiff.lab.evaluation.breakdown --model embedded-v2 --num-prompts 48 --threads 2
    python -m specdiff.lab.evaluation.breakdown --model runs/scene-v2          # a training run's EMA weights

Both prompt sets are the stratified ones of the benchmark (equal thirds of 1-, 2- and 3-object
scenes); prompt i uses seed i. Read by the style's checker.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import torch

from specdiff.lab.evaluation.benchmark import generate_images
from specdiff.lab.embedded.alignment import match_objects, strict_accuracy
from specdiff.lab.embedded.scenes import SHAPES, Scene, held_out_prompts, training_prompts

COLUMNS = ("exact_scene", "background", "colour", "shape", "size", "position", "unasked_per_image")


def generate(pipe, scenes: list[Scene], steps: int, batch_size: int) -> torch.Tensor:
    """Prompt i with seed i, in batches (the benchmark's seeded generation)."""
    captions = [s.caption() for s in scenes]
    return torch.cat([generate_images(pipe, captions[i : i + batch_size], range(i, min(i + batch_size, len(scenes))),
                                      steps, {}, torch.device("cpu"))[0] for i in range(0, len(scenes), batch_size)])


def breakdown(asked: list[Scene], seen: list[Scene]) -> dict:
    """Strict scores over all prompts and per object count; shape confusion counts (asked -> read)."""
    rows = {"all": strict_accuracy(asked, seen)}
    for count in sorted({len(s.objects) for s in asked}):
        picked = [i for i, s in enumerate(asked) if len(s.objects) == count]
        rows[f"{count} object{'s' if count > 1 else ''}"] = strict_accuracy([asked[i] for i in picked],
                                                                            [seen[i] for i in picked])
    confusion = collections.Counter()
    for a, s in zip(asked, seen):
        for obj, match in zip(a.objects, match_objects(a, s)):
            confusion[(obj.shape, match.shape if match is not None else "none")] += 1
    return {"rows": rows, "shape_confusion": {f"{a} -> {b}": n for (a, b), n in sorted(confusion.items())}}


def table(results: dict) -> str:
    lines = ["| prompts | scenes | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for split, result in results.items():
        for name, row in result["rows"].items():
            cells = [f"{row[c]:.2f}" if c == "unasked_per_image" else f"{100 * row[c]:.1f}%" for c in COLUMNS]
            lines.append(f"| {split} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Shapes asked -> read (objects matched in their cell or by colour; none = not found):", ""]
    names = list(SHAPES) + ["none"]
    lines += ["| split | asked | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for split, result in results.items():
        for shape in SHAPES:
            counts = [result["shape_confusion"].get(f"{shape} -> {n}", 0) for n in names]
            lines.append(f"| {split} | {shape} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines)


def load_model(model: str, temp: Path):
    """A scene model folder, `embedded-v2`, or a training run folder (its checkpoint's EMA weights)."""
    from specdiff.lab.loading import ModelLoadError, load_pipeline
    from specdiff.lab.embedded.pipeline import ScenePipeline

    if (Path(model) / "checkpoint.pt").is_file():
        from specdiff.lab.embedded.train import export_checkpoint

        export_checkpoint(Path(model) / "checkpoint.pt", temp / "model")
        model = str(temp / "model")
    try:
        pipe, _ = load_pipeline(model, "cpu", "float32")
    except ModelLoadError as error:
        raise SystemExit(f"breakdown: error: {error}") from None
    if not isinstance(pipe, ScenePipeline):
        raise SystemExit(f"breakdown: error: --model {model} is not a scene model (embedded-v2, a scene model "
                         "folder or a training run folder)")
    return pipe


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded-v2", help="embedded-v2, a scene model folder, or a training run folder")
    p.add_argument("--num-prompts", type=int, default=48, help="per split")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)
    for name in ("num_prompts", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"breakdown: error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from specdiff.lab.embedded.checker import load_checker, read_images

    with tempfile.TemporaryDirectory() as temp:
        pipe = load_model(args.model, Path(temp))
    pipe.set_progress_bar_config(disable=True)
    checker = load_checker(pipe.style)
    results = {}
    for split, prompts in (("train", training_prompts), ("heldout", held_out_prompts)):
        scenes = prompts(args.num_prompts, style=pipe.style)
        seen = read_images(checker, generate(pipe, scenes, args.steps, args.batch_size))
        results[split] = breakdown(scenes, seen)
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"command": vars(args) | {"out": str(args.out)}, "results": results}, indent=1))
        tmp.replace(args.out)
    return results


if __name__ == "__main__":
    main()
