"""`specdiff bench`'s options, kept free of heavy imports so that `specdiff --help` starts fast."""

from __future__ import annotations

import argparse

# kept in step with specdiff.lab.loading (not imported here: `specdiff --help` must start fast)
MODEL_CHOICES = ("embedded-v2 (the default), embedded, tiny-sd3, tiny-flux, tiny-flux2, tiny-qwenimage, tiny-wan, "
                 "tiny-zimage, or a local diffusers folder")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """--threads, shared by generate and bench."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, printed); 1 is steadier on a busy machine")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded-v2", help=MODEL_CHOICES)
    p.add_argument("--methods", nargs="+", default=["full", "specdiff"],
                   help="method[:key=value,...]; full compute is always included as the reference")
    p.add_argument("--num-prompts", type=int, default=16, help="prompts to generate with every method")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"], help="embedded model's prompt set")
    p.add_argument("--steps", type=int, default=28, help="denoising steps of every method")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i, the same for every method")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_threads_option(p)
    p.add_argument("--out", default="bench-output", help="folder for results.json, results.md, plots, grid")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompts to use, one per line (e.g. COCO captions)")
    p.add_argument("--clip-model", default=None, metavar="FOLDER_OR_ID",
                   help="a CLIP model in a local folder or your hub cache: adds the CLIP score (never downloaded)")
    p.add_argument("--fid-inception", default=None, metavar="FILE",
                   help="a local TorchScript Inception (inception-2015-12-05.pt of StyleGAN2-ADA / clean-fid): adds FID")
    p.add_argument("--fid-reference", default=None, metavar="FOLDER",
                   help="real images for FID (default: the full-compute images of the same prompts)")
    p.add_argument("--save-images", action="store_true",
                   help="also write every image as OUT/images/<method>/<prompt index>.png (e.g. for FID elsewhere)")
    return p


def build_tune_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--target", required=True,
                   help='METRIC>=VALUE or METRIC>=full-X: psnr>=30, ssim>=0.9, alignment>=full-2 (embedded '
                        'models; percent), clip>=full-0.5 (needs --clip-model)')
    p.add_argument("--model", default="embedded-v2", help=MODEL_CHOICES)
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="one prompt per line: the first --calibration for the search, the next --verify to check "
                        "(default: the embedded model's held-out scenes)")
    p.add_argument("--calibration", type=int, default=8, help="prompts the search scores settings on")
    p.add_argument("--verify", type=int, default=16, help="other prompts the finalists are verified and timed on")
    p.add_argument("--budget", type=float, default=20.0, help="minutes for the whole run (search + verification)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to search (default: every method with a speed knob, and full = fewer steps)")
    p.add_argument("--steps", type=int, default=28, help="the model's denoising steps: full compute's, the reference")
    p.add_argument("--steps-axis", default=None, metavar="N,N",
                   help="step counts every cache is searched at, its schedule scaled to each (default: --steps and "
                        "half of them; none = --steps only); plain fewer steps is searched anyway")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--margin", default="auto",
                   help="how far the calibration mean must clear the target: a number in the metric's units, or "
                        "auto = one standard error over the calibration prompts")
    p.add_argument("--rank", default="flops", choices=["flops", "wallclock"],
                   help="choose among the finalists by FLOPs ratio (deterministic) or by measured wall-clock")
    p.add_argument("--batch-size", type=int, default=8, help="calibration prompts per pipeline call")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i, the same for every setting")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_threads_option(p)
    p.add_argument("--clip-model", default=None, metavar="FOLDER_OR_ID", help="a local CLIP model for clip targets")
    p.add_argument("--out", default="tune-output", help="folder for tuned.json, summary.md, pareto.png")
    return p
