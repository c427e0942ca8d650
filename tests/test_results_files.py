"""Committed results files are strict JSON (no Infinity / NaN, which strict parsers refuse)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _refuse(constant):
    raise ValueError(f"{constant} is not strict JSON")


@pytest.mark.skipif(not RESULTS.is_dir(), reason="no results folder beside the tests (an installed copy)")
def test_every_results_file_is_strict_json():
    files = sorted(list(RESULTS.rglob("*.json")) + list(RESULTS.rglob("*.jsonl")))
    assert len(files) > 20
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines() if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
        for line in filter(str.strip, lines):
            json.loads(line, parse_constant=_refuse)  # raises, naming the constant
