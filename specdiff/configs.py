"""Configs as JSON: the file `specdiff tune` writes (tuned.json) and `load_config` reads back.

    {"format": "specdiff-tuned/1", "method": "specdiff", "config": {"cache_ratio": 0.9, ...},
     "num_inference_steps": 28, ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

from specdiff.engine.policy import ConfigError, PolicyConfig

FORMAT = "specdiff-tuned/1"
MAX_TEXT_BYTES = 16 * 2**20  # a config or prompt file larger than this is refused before it is read


def read_text_file(path, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes. Checked before it is opened (links are
    followed): a device (/dev/zero), a pipe with no writer, a folder, or a file too large is a
    ConfigError naming `what` and the file, never an endless read."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as error:
        raise ConfigError(f"{what} {str(path)!r}: cannot read it ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {str(path)!r} is not a regular file (a device, pipe or folder); give a text file")
    if info.st_size > limit:
        raise ConfigError(f"{what} {str(path)!r} is {info.st_size:,} bytes; at most {limit:,} are read")
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)  # bounded even if the file grows meanwhile
    except OSError as error:
        raise ConfigError(f"{what} {str(path)!r}: cannot read it ({error.strerror})") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {str(path)!r} is larger than {limit:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text") from None


def config_from_record(record: dict, where: str) -> PolicyConfig:
    """The config object of a {"method": ..., "config": {...}} record (tuned.json or a comparison row)."""
    from specdiff.policies.registry import POLICIES

    method = record.get("method")
    if not isinstance(method, str) or method not in POLICIES:
        raise ConfigError(f"{where}: method {method!r} is not one of {', '.join(POLICIES)}"[:400])
    fields = record.get("config", {})
    if fields is None:
        fields = {}
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: 'config' must be an object of field: value, got {type(fields).__name__} "
                          f"{fields!r}"[:400])
    config_type = POLICIES[method][0]
    known = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"{where}: {config_type.__name__} has no field {unknown[0]!r}; its fields: "
                          f"{', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return config_type(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


@dataclasses.dataclass(frozen=True)
class TunedSetting:
    """Everything a tuned.json chose: the config for `enable` and the step count for the pipeline call
    (a cache tuned on fewer steps, or plain fewer steps, is only as fast as tuned with both)."""

    config: PolicyConfig
    num_inference_steps: int | None  # None: the file does not say (a config saved without it)
    model: str | None = None  # what it was tuned on, as the file records it
    reference_steps: int | None = None  # the model's own step count the speed-up was measured against


def load_tuned(path) -> TunedSetting:
    """The whole setting saved by `specdiff tune` or `save_config`:

        tuned = specdiff.load_tuned("tuned.json")
        specdiff.enable(pipe, tuned.config)
        pipe(prompt, num_inference_steps=tuned.num_inference_steps)
    """
    record = read_tuned(path)
    model = record.get("model")
    reference = record.get("steps")
    return TunedSetting(config_from_record(record, str(path)), record.get("num_inference_steps"),
                        model if isinstance(model, str) else None,
                        reference if isinstance(reference, int) and not isinstance(reference, bool) else None)


def load_config(path) -> PolicyConfig:
    """The config saved by `specdiff tune` (tuned.json), as the config object to pass to `enable`.

    The file's step count is not part of a config: when it differs from the model's own (plain fewer
    steps, or a cache tuned on fewer steps) a warning says so; `load_tuned` returns both."""
    tuned = load_tuned(path)
    if tuned.num_inference_steps is not None and tuned.num_inference_steps != tuned.reference_steps:
        import warnings

        warnings.warn(f"{path}: the tuned setting runs {tuned.num_inference_steps} steps"
                      + (f" (the model's own: {tuned.reference_steps})" if tuned.reference_steps else "")
                      + f"; pass num_inference_steps={tuned.num_inference_steps} to the pipeline, or use "
                      "specdiff.load_tuned, which returns the config and the step count", stacklevel=2)
    return tuned.config


def read_tuned(path) -> dict:
    where = str(path)
    text = read_text_file(path, "config file")
    try:
        record = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{where} nests too deeply to be a file written by `specdiff tune`") from None
    except ValueError as error:  # JSONDecodeError, and integers longer than Python parses
        raise ConfigError(f"{where} is not a JSON file written by `specdiff tune` ({str(error)[:200]})") from None
    if not isinstance(record, dict) or "method" not in record:
        raise ConfigError(f"{where}: expected an object with 'method' and 'config' (as `specdiff tune` writes)")
    if record.get("met") is False or record.get("method") is None:
        raise ConfigError(f"{where}: the tune found no setting that met {record.get('target', 'its target')!r}; "
                          "there is no config to load")
    steps = record.get("num_inference_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"{where}: num_inference_steps must be a positive integer, got {steps!r}")
    return record


def save_config(config: PolicyConfig, path, num_inference_steps: int | None = None) -> None:
    """Write a config as a tuned.json-style file that `load_config` reads back."""
    if not isinstance(config, PolicyConfig):
        raise ConfigError(f"save_config: config must be a specdiff config, got {type(config).__name__}")
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                            or not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ConfigError(f"save_config: num_inference_steps must be a positive integer or None, "
                          f"got {num_inference_steps!r}")
    record = {"format": FORMAT, "method": config.method, "config": dataclasses.asdict(config),
              "num_inference_steps": num_inference_steps}
    try:
        text = json.dumps(record, indent=1, allow_nan=False)
        read_back = config_from_record(json.loads(text), "save_config")
    except (TypeError, ValueError) as error:  # ConfigError is a ValueError
        raise ConfigError(f"save_config: {type(config).__name__} cannot be written as a file load_config reads "
                          f"back ({error})") from None
    if read_back != config or type(read_back) is not type(config):
        raise ConfigError(f"save_config: {type(config).__name__} would load back as {read_back!r}; only configs of "
                          "registered methods with JSON-representable fields can be saved")
    write_atomically(Path(path), text)


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
