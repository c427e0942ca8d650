"""The benchmark's outputs: strict JSON, the Markdown table, the Pareto plot, the image grid, image files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from specdiff.lab.evaluation.methods import FULL


def strict_json(value, why: str | None = None):
    """A copy that strict JSON parsers accept: every infinite or NaN number becomes null, and beside it
    a `<key>_why` field says what it was (an infinite PSNR: the image equals full compute's)."""
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if isinstance(item, float) and not np.isfinite(item):
                result[key] = None
                result[f"{key}_why"] = ("infinite: identical to full compute" if key.startswith("psnr") and item > 0
                                        else "infinite" if np.isinf(item) else "not a number (undefined here)")
            else:
                result[key] = strict_json(item)
        return result
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        return strict_json(value.item())
    return value


def markdown_table(rows) -> str:
    has_align = "align_exact_scene" in rows[0]
    head = "| method | s / image | wall-clock speed-up | FLOPs ratio | PSNR dB | SSIM |"
    rule = "|---|---|---|---|---|---|"
    has_clip = "clip_score" in rows[0]
    has_fid = "fid" in rows[0]
    if has_align:
        head += " exact scene | colour | shape | size | position | unasked / image | lenient | Fréchet dist. |"
        rule += "---|---|---|---|---|---|---|---|"
    if has_clip:
        head += " CLIP score | CLIP FD to full |"
        rule += "---|---|"
    if has_fid:
        head += " FID |"
        rule += "---|"
    head += " speculation | scoring | peak MB |"
    rule += "---|---|---|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['method']} | {r['seconds_per_image_median']:.3f} | {r['speedup_wallclock_median']:.2f}x | "
            f"{r['flops_ratio']:.2f}x | {r['psnr_mean']:.2f} | {r['ssim_mean']:.3f} |"
        )
        if has_align:
            line += "".join(f" {100 * r['align_' + k]:.1f}% |" for k in ("exact_scene", "colour", "shape", "size", "position"))
            line += f" {r['align_unasked_per_image']:.2f} | {100 * r['align_lenient_mean']:.1f}% | {r['frechet_distance']:.2f} |"
        if has_clip:
            line += f" {r['clip_score']:.2f} | {r.get('clip_fd_to_full', float('nan')):.3f} |"
        if has_fid:
            line += f" {r['fid']:.2f} |"
        line += f" {100 * r['speculation_share']:.1f}% | {100 * r['scoring_share']:.1f}% | {r['peak_memory_mb_max']:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def pareto_plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("psnr_mean", "PSNR vs full compute (dB)")]
    if "align_exact_scene" in rows[0]:
        panels.append(("align_exact_scene", "exact-scene rate (strict alignment)"))
    if "clip_score" in rows[0]:
        panels.append(("clip_score", "CLIP score"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    families = {}
    for r in rows:
        families.setdefault(r["method"].split(":")[0], []).append(r)
    colours = {family: f"C{i % 10}" for i, family in enumerate(families)}  # one colour per method in every panel
    for ax, (key, label) in zip(axes[0], panels):
        for family, members in families.items():
            points = sorted((r["speedup_wallclock_median"], r[key]) for r in members if np.isfinite(r[key]))
            if not points:
                continue
            # every setting as a marker; the line joins the family's best trade-offs (its Pareto front)
            front = [p for p in points if not any(q[0] >= p[0] and q[1] > p[1] for q in points if q != p)]
            ax.plot([x for x, _ in front], [y for _, y in front], marker="o", label=family, color=colours[family])
            ax.scatter([x for x, _ in points], [y for _, y in points], color=colours[family], s=18)
        ax.set_xlabel("wall-clock speed-up over full compute")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # every method identical to full compute: nothing to plot
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_grid(methods, records, prompts: list[str], path: Path, max_rows: int = 8) -> None:
    """Rows = prompts (text on the left), columns = methods (names written upwards on top)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    per = {m.label: {} for m in methods}
    for r in records:
        for k, i in enumerate(r["prompt_indices"]):
            per[r["method"]][i] = r["images"][k]
    rows = sorted(per[FULL])[:max_rows]
    h, w = per[FULL][rows[0]].shape[1:]
    scale = max(1, 96 // max(h, w))
    cell_w, cell_h, pad = w * scale, h * scale, 2
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3]) + 2
    wrapped = {i: textwrap.wrap(prompts[i], 28)[: max(1, cell_h // line_h)] for i in rows}
    left = int(max((measure.textlength(t, font=font) for i in rows for t in wrapped[i]), default=0)) + 10
    top = int(max(measure.textlength(m.label, font=font) for m in methods)) + 8
    sheet = Image.new("RGB", (left + (cell_w + pad) * len(methods), top + (cell_h + pad) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for x, m in enumerate(methods):
        label = Image.new("RGB", (top - 4, line_h), "white")
        ImageDraw.Draw(label).text((0, 0), m.label, fill="black", font=font)
        sheet.paste(label.rotate(90, expand=True), (left + x * (cell_w + pad) + (cell_w - line_h) // 2, 2))
    for y, i in enumerate(rows):
        y0 = top + y * (cell_h + pad)
        for n, text in enumerate(wrapped[i]):
            draw.text((4, y0 + n * line_h), text, fill="black", font=font)
        for x, m in enumerate(methods):
            img = per[m.label][i].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
            tile = Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8))
            sheet.paste(tile, (left + x * (cell_w + pad), y0))
    sheet.save(path)


def save_images(methods, records, folder: Path) -> None:
    from PIL import Image

    for spec in methods:
        target = folder / re.sub(r"[^A-Za-z0-9._=-]+", "_", spec.label)
        target.mkdir(parents=True, exist_ok=True)
        for r in (r for r in records if r["method"] == spec.label):
            for k, i in enumerate(r["prompt_indices"]):
                pixels = (r["images"][k].transpose(1, 2, 0).clip(0, 1) * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(target / f"{i:05d}.png")
