"""Every file the command line or load_config reads is checked before it is read (a regular file of a
bounded size), and tuned.json's contents are validated field by field, each error one line naming it."""

from __future__ import annotations

import json
import os

import pytest

import specdiff
from specdiff.configs import read_text_file
from specdiff.engine.policy import ConfigError


@pytest.fixture()
def special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: opening it would block forever
    link = tmp_path / "random-link"
    link.symlink_to("/dev/urandom")
    return {"/dev/zero": "/dev/zero", "a link to /dev/urandom": str(link), "a FIFO": str(fifo),
            "a folder": str(tmp_path)}


def test_special_files_are_refused_before_they_are_read(special_files):
    for name, path in special_files.items():
        with pytest.raises(ConfigError, match="not a regular file") as error:
            read_text_file(path, "--prompts")
        assert path in str(error.value) and "\n" not in str(error.value), name
        with pytest.raises(ConfigError, match="not a regular file"):
            specdiff.load_config(path)


def test_a_large_file_is_refused_by_its_size(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as file:
        file.truncate(17 * 2**20)  # sparse: no memory or disk to speak of
    with pytest.raises(ConfigError, match="bytes; at most"):
        specdiff.load_config(big)


def test_the_cli_refuses_special_files_in_one_line(special_files, capsys):
    from specdiff.lab.cli import main

    for path in special_files.values():
        assert main(["generate", "a red circle", "--config", path]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("specdiff: error:") and "not a regular file" in err and "\n" not in err
        assert main(["bench", "--prompts", path, "--num-prompts", "1", "--methods", "full"]) == 2
        err = capsys.readouterr().err.strip()
        assert "not a regular file" in err and "\n" not in err


@pytest.mark.parametrize("record, message", [
    ({"method": ["ras"], "config": {}}, "method \\['ras'\\] is not one of"),
    ({"method": {"name": "ras"}, "config": {}}, "is not one of"),
    ({"method": "ras", "config": []}, "'config' must be an object"),
    ({"method": "ras", "config": 0}, "'config' must be an object"),
    ({"method": "ras", "config": False}, "'config' must be an object"),
    ({"method": "ras", "config": {"cache_ratio": "high"}}, "cache_ratio"),
])
def test_tuned_json_fields_are_validated(tmp_path, record, message):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=message):
        specdiff.load_config(path)


def test_deep_nesting_and_huge_integers_are_config_errors(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nests too deeply|not a JSON file"):
        specdiff.load_config(deep)
    huge = tmp_path / "huge.json"
    huge.write_text('{"method": "fora", "config": {"interval": ' + "9" * 5000 + "}}")
    with pytest.raises(ConfigError, match="not a JSON file"):
        specdiff.load_config(huge)


def test_a_config_tuned_on_another_model_is_applied_with_a_warning(tmp_path, capsys):
    from specdiff.lab.cli import build_parser, _config_from_args

    path = tmp_path / "tuned.json"
    specdiff.save_config(specdiff.FORAConfig(interval=4), path, num_inference_steps=5)
    record = json.loads(path.read_text())
    record["model"] = "embedded-v2"
    path.write_text(json.dumps(record))
    args = build_parser().parse_args(["generate", "x", "--config", str(path), "--model", "tiny-sd3"])
    assert _config_from_args(args) == specdiff.FORAConfig(interval=4)
    err = capsys.readouterr().err
    assert "tuned on --model embedded-v2, not tiny-sd3" in err
