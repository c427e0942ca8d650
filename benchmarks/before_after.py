"""The engine before and after a change, in one run: engine_speed.py (this checkout's script) runs
alternately against an older commit's `specdiff` package and this checkout's, round by round, so both
see the same machine state; medians over rounds, side by side.

    python benchmarks/before_after.py --before 2ef61e3 --rounds 2 -- --preset sd3-medium --blocks 2 --calls 3 --repeats 1 --threads 2
    python benchmarks/before_after.py --before 2ef61e3 --rounds 3 -- --width 512 --layers 4 --size 128 --repeats 1

Everything after `--` goes to engine_speed.py (per-call mode with --preset, else whole generations).
The older package is extracted with `git archive` into a temporary folder and put first on PYTHONPATH;
each run's JSON names the package it imported, and a run that imported the wrong one is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "engine_speed.py"
KEYS = ("ms_wall", "efficiency_wall", "efficiency_blocks_wall", "efficiency_cpu", "efficiency_blocks_cpu",  # per call
        "seconds_median", "speedup", "efficiency")  # whole generations


def extract(ref: str, folder: Path) -> str:
    """`specdiff/` of commit `ref` into folder; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = folder / "src.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), commit, "specdiff"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return commit


def run_once(package_root: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    imported = Path(result["specdiff"]).resolve()
    if package_root.resolve() not in imported.parents:
        raise SystemExit(f"before_after: the run meant for {package_root} imported specdiff from {imported}")
    return result


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="a commit (or ref) whose specdiff package is the baseline")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the table and the raw runs here (a folder)")
    args = p.parse_args(ours)
    if args.rounds < 1:
        raise SystemExit(f"before_after: --rounds must be at least 1, got {args.rounds}")
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commit = extract(args.before, tmp)
        roots = {"before": tmp, "after": ROOT}
        for round_index in range(args.rounds):
            order = ("before", "after") if round_index % 2 == 0 else ("after", "before")  # alternate who goes first
            for label in order:
                runs[label].append(run_once(roots[label], theirs, tmp / f"{label}-{round_index}.json"))
                print(f"round {round_index + 1}/{args.rounds}: {label} done", file=sys.stderr)
    methods = [r["method"] for r in runs["after"][0]["rows"]]
    keys = [k for k in KEYS if k in runs["after"][0]["rows"][0] and runs["after"][0]["rows"][0][k] is not None]

    def median(label, method, key):
        values = [r[key] for run in runs[label] for r in run["rows"] if r["method"] == method and r.get(key) is not None]
        return statistics.median(values) if values else None

    lines = [f"before = {commit[:10]}, after = this checkout; engine_speed.py {' '.join(theirs)}; "
             f"medians over {args.rounds} alternating rounds", "",
             "| method | " + " | ".join(f"{k} before | {k} after" for k in keys) + " |",
             "|---|" + "---|---|" * len(keys)]
    for method in methods:
        cells = []
        for key in keys:
            for label in ("before", "after"):
                value = median(label, method, key)
                cells.append("-" if value is None else (f"{100 * value:.0f} %" if "efficiency" in key else f"{value:.3g}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "before_after.md").write_text(table + "\n")
        (args.out / "runs.json").write_text(json.dumps({"before": commit, "runs": runs}, indent=1))
    return runs


if __name__ == "__main__":
    main()
