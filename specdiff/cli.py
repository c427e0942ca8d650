"""The `specdiff` command.

    specdiff generate "a large red circle at the top left on a white background"
    specdiff generate "PROMPT" --method ras --cache-ratio 0.5
    specdiff generate "PROMPT" --model /path/to/local/sd3-or-flux-folder --steps 28
    specdiff methods
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _methods_table() -> str:
    from specdiff.policies.registry import POLICIES

    lines = []
    for name, (config_type, _) in POLICIES.items():
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(config_type))
        lines.append(f"{name:<10} {config_type.__name__}({fields})")
    return "\n".join(lines)


def _config_fields() -> dict[str, list[tuple[str, dataclasses.Field, type]]]:
    """Every config field of every registered method: name -> [(method, field, type)]."""
    import typing

    from specdiff.policies.registry import POLICIES

    fields: dict[str, list] = {}
    for method, (config_type, _) in POLICIES.items():
        hints = typing.get_type_hints(config_type)
        for field in dataclasses.fields(config_type):
            fields.setdefault(field.name, []).append((method, field, hints[field.name]))
    return fields


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field, generated from the dataclasses (so no field is missing)."""
    group = parser.add_argument_group("method settings (each applies to the methods named in its help)")
    for name, uses in _config_fields().items():
        kind = uses[0][2]
        where = ", ".join(f"{method} (default {field.default!r})" for method, field, _ in uses)
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=name, choices=["on", "off"], help=f"{where}")
        elif kind in (int, float, str):
            group.add_argument(flag, dest=name, type=kind, help=where)
        else:  # step lists
            group.add_argument(flag, dest=name, type=int, nargs="*", help=f"{where}; step indices")
    group.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                       help="any config field, written as in `specdiff bench` (e.g. --set reset_steps=12/22)")


def _build_config(args):
    from specdiff.evaluation.benchmark import _parse_value
    from specdiff.engine.policy import ConfigError
    from specdiff.policies.registry import POLICIES, config_for

    if args.method not in POLICIES:
        raise CLIError(f"--method must be one of {', '.join(POLICIES)}, got {args.method!r}")
    names = {f.name for f in dataclasses.fields(POLICIES[args.method][0])}
    fields = {}
    for name in _config_fields():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in names:
            raise CLIError(f"--{name.replace('_', '-')} does not apply to --method {args.method}; "
                           f"its fields: {', '.join(sorted(names)) or 'none'}")
        fields[name] = (value == "on") if value in ("on", "off") else tuple(value) if isinstance(value, list) else value
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in names:
            raise CLIError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(names))}")
        parsed = _parse_value(value.strip())
        if isinstance(parsed, int) and not isinstance(parsed, bool) and key.strip() == "reset_steps":
            parsed = (parsed,)
        fields[key.strip()] = parsed
    try:
        return config_for(args.method, **fields)
    except (ConfigError, TypeError) as error:
        raise CLIError(str(error)) from None


def load_pipeline(model: str | None, device: str, dtype_name: str):
    """The library's loader, its errors as one-line CLI errors."""
    from specdiff.loading import ModelLoadError
    from specdiff.loading import load_pipeline as load

    try:
        return load(model, device, dtype_name)
    except ModelLoadError as error:
        raise CLIError(str(error)) from None


def _generate(pipe, args, seed: int):
    import torch

    kwargs = dict(prompt=args.prompt, num_inference_steps=args.steps, output_type="pt")
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    if args.height:
        kwargs["height"] = args.height
    if args.width:
        kwargs["width"] = args.width
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    tic = time.perf_counter()
    image = pipe(**kwargs, generator=generator).images[0]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return image.float().cpu(), time.perf_counter() - tic


def _save(image, path: Path, scale: int) -> None:
    from PIL import Image

    array = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    picture = Image.fromarray(array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)


def check_output_folder(path: str, option: str = "--out") -> Path:
    """Refuse an output folder that cannot be written, before any work; create nothing."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"{option} {out} exists and is not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {out}: cannot write there ({existing} is not a writable folder)")
    return out


def check_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; anything unusable is refused in one line."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: this torch build has no CUDA device (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def check_image_size(pipe, height: int | None, width: int | None) -> None:
    """Height and width must be positive multiples of what the model divides them by."""
    from specdiff.reference.pipeline import ScenePipeline

    patch = pipe.transformer.config.patch_size
    factor = patch if isinstance(pipe, ScenePipeline) else getattr(pipe, "vae_scale_factor", 8) * 2
    largest = None
    if isinstance(pipe, ScenePipeline):  # its position table covers this many pixels a side
        largest = pipe.transformer.config.pos_embed_max_size * patch
    for option, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % factor):
            raise CLIError(f"{option} must be a positive multiple of {factor} for this model, got {value}")
        if value is not None and largest is not None and value > largest:
            raise CLIError(f"{option} {value} is larger than this model draws (at most {largest} pixels)")


def cmd_generate(args) -> int:
    import torch

    import specdiff
    from specdiff.evaluation.metrics import psnr, ssim

    config = _build_config(args)
    out = check_output_folder(args.out)
    args.device = check_device(args.device)
    pipe, description = load_pipeline(args.model, args.device, args.dtype)
    check_image_size(pipe, args.height, args.width)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    print(f"model: {description}; method: {config}")

    # one short warm-up so that neither timed run pays for first-call costs
    warm = argparse.Namespace(**{**vars(args), "steps": 2})
    _generate(pipe, warm, args.seed)
    times = {"full": [], "accelerated": []}
    images = {}
    for _ in range(args.repeats):
        images["full"], seconds = _generate(pipe, args, args.seed)
        times["full"].append(seconds)
        specdiff.enable(pipe, config)
        try:
            images["accelerated"], seconds = _generate(pipe, args, args.seed)
            summary = specdiff.summary(pipe)
        finally:
            specdiff.disable(pipe)
        times["accelerated"].append(seconds)

    full_s, fast_s = statistics.median(times["full"]), statistics.median(times["accelerated"])
    speedup = statistics.median(f / a for f, a in zip(times["full"], times["accelerated"]))
    quality_psnr = psnr(images["full"], images["accelerated"])
    quality_ssim = ssim(images["full"], images["accelerated"])
    out.mkdir(parents=True, exist_ok=True)
    scale = max(1, 256 // max(images["full"].shape[-2:]))
    _save(images["full"], out / "full.png", 1)
    _save(images["accelerated"], out / f"{config.method}.png", 1)
    side = torch.cat([images["full"], torch.ones(3, images["full"].shape[1], 1), images["accelerated"]], dim=2)
    _save(side, out / "side_by_side.png", scale)
    print(f"full compute : {full_s:.3f} s / image (median of {args.repeats})")
    print(f"{config.method:<13}: {fast_s:.3f} s / image (speculation {summary.speculation_seconds:.3f} s, "
          f"scoring {summary.scoring_seconds:.3f} s)")
    print(f"speed-up     : {speedup:.2f}x wall-clock")
    print(f"fidelity     : PSNR {quality_psnr:.2f} dB, SSIM {quality_ssim:.4f} (accelerated vs full compute)")
    print(f"saved        : {out / 'full.png'}, {out / (config.method + '.png')}, {out / 'side_by_side.png'}")
    if args.summary:
        print(summary)
    return 0


def cmd_bench(args) -> int:
    from specdiff.evaluation.benchmark import run_benchmark
    from specdiff.evaluation.metrics import QualityModelMissing
    from specdiff.loading import ModelLoadError
    from specdiff.engine.policy import ConfigError

    args.argv = sys.argv[2:]
    for side in ("height", "width"):
        if getattr(args, side) is not None and getattr(args, side) < 1:
            raise CLIError(f"--{side} must be a positive number of pixels, got {getattr(args, side)}")
    for option in ("num_prompts", "batch_size"):
        if getattr(args, option) < 1:
            raise CLIError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    check_output_folder(args.out)
    args.device = check_device(args.device)
    try:
        run_benchmark(args, check_size=check_image_size)
    except (ConfigError, QualityModelMissing, ModelLoadError) as error:
        raise CLIError(str(error)) from None
    except ValueError as error:  # the pipeline refusing a size or a setting, before any output is written
        raise CLIError(f"the pipeline refused the settings: {error}") from None
    return 0


def cmd_methods(args) -> int:
    print(_methods_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdiff", description="Faster diffusion transformers by token caching.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate with full compute and with a cache; compare speed and fidelity")
    gen.add_argument("prompt")
    gen.add_argument("--method", default="specdiff", help="specdiff (default), ras, random, toca, fora, taylorseer, firstblock, full")
    gen.add_argument("--steps", type=int, default=28)
    gen.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--repeats", type=int, default=3, help="timed runs of each (medians are reported)")
    gen.add_argument("--model", default=None, help="local diffusers SD3 / SD3.5 / FLUX folder (default: embedded model)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--out", default="specdiff-output", help="folder for the images (created)")
    gen.add_argument("--summary", action="store_true", help="print the per-step table of the accelerated run")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_options(gen)
    gen.set_defaults(func=cmd_generate)

    from specdiff.evaluation.benchmark import build_parser as bench_parser

    bench = sub.add_parser("bench", help="every method's speed and quality side by side (tables, plot, grid)")
    bench_parser(bench)
    bench.set_defaults(func=cmd_bench)

    methods = sub.add_parser("methods", help="list the methods and their config fields with defaults")
    methods.set_defaults(func=cmd_methods)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", 1) is not None and getattr(args, "steps", 1) < 1:
        print("specdiff: error: --steps must be at least 1", file=sys.stderr)
        return 2
    if getattr(args, "repeats", 1) < 1:
        print("specdiff: error: --repeats must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= getattr(args, "seed", 0) < 2**63:
        print(f"specdiff: error: --seed must be in [0, 2**63), got {args.seed}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except CLIError as error:
        print(f"specdiff: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
