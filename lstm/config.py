"""Configs as frozen dataclasses: defaults <- a preset (``--config``) <- a JSON file
(``--config-file``) <- one flag per field (:func:`add_config_flags` derives them, so a new field
is a new flag). Unknown names, bad values and a flag given where it has no effect
(``unused_flags``) are one-line errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Mapping, Optional, Sequence, Type, TypeVar

from lstm import user_files
from lstm.errors import UserError
from lstm.storage import NAME_RULE

C = TypeVar("C")


@dataclass(frozen=True)
class TaskConfig:
    """Fields every task config has. Subclasses add their hyperparameters."""

    seed: int = 0

    # A field's --help line beyond its default: what it needs, where that helps.
    flag_help: ClassVar[Mapping[str, str]] = {}

    def validate(self) -> None:
        """Raise UserError for impossible values. Subclasses extend this."""

    def unused_flags(self) -> dict[str, str]:
        """The flags that have no effect with this config's values, each with the rest of the line
        that refuses it when given on the command line (:func:`refuse_unused`; a preset's or a
        file's value is not refused): ``{"mixtures": "needs --head mdn (...); ..."}``."""
        return {}


@dataclass(frozen=True)
class RunSettings:
    """How and where a run executes, not what it learns: a search's best config leaves the scale to launch."""

    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with --gpu; below 1, several runs (trials) share a GPU
    cpus_per_worker: int = 0  # 0: a fair share of the cluster (lstm.cluster.auto_cpus_per_worker)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a GradScaler; GPU only)
    storage_path: str = ""  # '' -> $LSTM_RAY_STORAGE or ~/lstm-ray/runs (lstm.storage)
    name: str = ""  # '' -> <task>-<timestamp>
    max_failures: int = 3
    checkpoints_to_keep: int = 2
    data_dir: str = ""  # '' -> $LSTM_DATA_DIR or the download cache
    wait_for_workers_s: float = -1  # -1: 600 s if an autoscaler can add nodes, else refuse at once
    mlflow_tracking_uri: str = ""  # '' -> $MLFLOW_TRACKING_URI, or no MLflow

    flag_help: ClassVar[Mapping[str, str]] = {
        "gpus_per_worker": "needs --gpu: each worker's share of a GPU; below 1, several one-worker runs share one",
        "precision": "fp32, bf16 (autocast; on a GPU or a CPU) or fp16 (autocast and a loss scaler; needs --gpu)",
        "data_dir": "the data folder of a task that reads data; '' is $LSTM_DATA_DIR or the download cache",
        "name": f"the run's folder name in the storage path: {NAME_RULE}; '' is <task>-<timestamp>",
    }

    def validate(self) -> None:
        check_fields(self, ("num_workers",), lambda v: v >= 1, "a positive integer")
        check_fields(self, ("cpus_per_worker",), lambda v: v >= 0, ">= 1, or 0 for a fair share of the cluster")
        if self.max_failures < -1:
            raise UserError(f"--max-failures must be -1 (retry forever) or >= 0 (got {self.max_failures})")
        check_fields(self, ("checkpoints_to_keep",), lambda v: v >= 1, ">= 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UserError(f"--precision must be fp32, bf16 or fp16 (got {self.precision!r})")
        if self.precision == "fp16" and not self.use_gpu:
            raise UserError("--precision fp16 needs --gpu; on CPU use bf16 or fp32")
        self._validate_gpus()

    def _validate_gpus(self) -> None:
        g = self.gpus_per_worker
        if not (math.isfinite(g) and g > 0 and (g <= 1 or g == int(g))):
            raise UserError(f"--gpus-per-worker must be a fraction in (0, 1] or a whole number (got {g:g})")
        if self.use_gpu and g < 1 and self.num_workers > 1:
            raise UserError(
                f"--gpus-per-worker {g:g} with --num-workers {self.num_workers} could put two ranks of "
                "one run on the same GPU, which nccl cannot do; use whole GPUs for a run of several "
                "workers, or --num-workers 1 to share GPUs between runs"
            )

    def unused_flags(self) -> dict[str, str]:
        """The run flags that have no effect with these settings (see TaskConfig.unused_flags)."""
        if self.use_gpu:
            return {}
        return {
            "gpus_per_worker": "needs --gpu (without it the workers use no GPU); add --gpu, or drop --gpus-per-worker"
        }

    @property
    def gpus(self) -> float:
        """GPUs each worker asks Ray for (0 without --gpu)."""
        return self.gpus_per_worker if self.use_gpu else 0.0


def check_fields(config: Any, names: Sequence[str], ok: Callable[[Any], bool], rule: str) -> None:
    """UserError ``--field must be <rule> (got value)`` for the first field failing ``ok``."""
    for name in names:
        value = getattr(config, name)
        if value is None or not ok(value):
            raise UserError(f"{flag_name(name)} must be {rule} (got {value})")


def refuse_unused(given: Collection[str], unused: Mapping[str, str]) -> None:
    """UserError ``--flag <why>`` for the first field in ``given`` that ``unused`` names."""
    for name, why in unused.items():
        if name in given:
            raise UserError(f"{flag_name(name)} {why}")


def positive_finite(value: float) -> bool:
    return value > 0 and math.isfinite(value)


# --------------------------------------------------------------------------- values


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def parse_value(tp: Any, raw: Any, name: str) -> Any:
    """Convert ``raw`` (a string from the command line, or a JSON value) to type ``tp``."""
    base, optional = _unwrap_optional(tp)
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"{name} cannot be empty")
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            if isinstance(raw, bool):
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw.replace("_", ""))
        if base is float:
            if isinstance(raw, str) and "/" in raw:  # "1/1.15", as the tutorial writes lr_decay
                num, den = raw.split("/", 1)
                return float(num) / float(den)
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if base is str:
            if not isinstance(raw, (str, os.PathLike)):  # a number or a list from a JSON file
                raise ValueError
            return os.fspath(raw)
        if typing.get_origin(base) is tuple:
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            (elem,) = set(typing.get_args(base)) - {Ellipsis}
            return tuple(parse_value(elem, x.strip() if isinstance(x, str) else x, name) for x in items)
    except (ValueError, TypeError, ZeroDivisionError):
        pass
    else:
        raise TypeError(f"unsupported config field type {tp!r} for {name}")
    tname = getattr(base, "__name__", str(base))
    raise UserError(f"{name} must be {'an' if tname[0] in 'aeiou' else 'a'} {tname} (got {raw!r})")


def scalar_fields(cls: type) -> dict[str, type]:
    """The fields of scalar type (int, float, bool, str; Optional unwrapped): name -> type."""
    out = {}
    for f in fields(cls):
        base, _ = _unwrap_optional(_field_type(cls, f.name))
        if base in (int, float, bool, str):
            out[f.name] = base
    return out


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


# --------------------------------------------------------------------------- building


def build(cls: Type[C], overrides: Mapping[str, Any], *, source: str = "config") -> C:
    """Instantiate ``cls`` from defaults + ``overrides`` (raw values), then validate."""
    unknown, known = unknown_fields(cls, overrides)
    if unknown:
        raise UserError(f"unknown {source} field(s) {unknown} for {cls.__name__}; known fields: {known}")
    values = {k: parse_value(_field_type(cls, k), v, k) for k, v in overrides.items()}
    config = cls(**values)
    config.validate()  # type: ignore[attr-defined]
    return config


def unknown_fields(cls: type, values: Mapping[str, Any]) -> tuple[str, str]:
    """The names in ``values`` that are no field of ``cls``, and its fields, each as a list in a message."""
    known = {f.name for f in fields(cls)}
    return ", ".join(sorted(set(values) - known)), ", ".join(sorted(known))


CONFIG_FILE_FIX = "pass the path of a JSON file such as a search's best_config.json"
JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON config file (a dict of field -> value; optional 'task' and 'preset')."""
    p = Path(path).expanduser()
    text = user_files.read_text(p, what="config file", fix=CONFIG_FILE_FIX)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"config file {p} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it"
        ) from None
    if not isinstance(data, dict):
        raise UserError(
            f"config file {p} holds {JSON_KINDS.get(type(data), 'null')}, not a JSON object of field names to "
            f"values; {CONFIG_FILE_FIX}"
        )
    if isinstance(data.get("config"), dict):  # accept a results.json too: its 'config' section
        data = {**data["config"], **({"task": data["task"]} if "task" in data else {})}
    for key, what in (("task", "a task such as 'ptb'"), ("preset", "a named config such as 'small'")):
        if key in data and not isinstance(data[key], str):
            raise UserError(f"config file {p}: {key!r} must be the name of {what} (got {data[key]!r}); fix the file")
    return data


def check_file_values(cls: type, values: Mapping[str, Any], path: str | os.PathLike) -> None:
    """UserError naming the config file for a field ``cls`` lacks, or a value of the wrong type."""
    unknown, known = unknown_fields(cls, values)
    if unknown:
        raise UserError(
            f"config file {path} has unknown field(s) {unknown} for {cls.__name__}; remove them, "
            f"or pass the file to the job of its task (known fields: {known})"
        )
    for name, value in values.items():
        try:
            parse_value(_field_type(cls, name), value, name)
        except UserError as e:
            raise UserError(
                f"config file {path}: {e}; fix the value in the file, or override it with {flag_name(name)}"
            ) from None


def resolve(
    cls: Type[C],
    presets: Mapping[str, Mapping[str, Any]],
    *,
    preset: Optional[str] = None,
    config_file: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    task_name: Optional[str] = None,
) -> C:
    """defaults <- preset <- config file <- overrides, validated."""
    values: dict[str, Any] = {}
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = read_config_file(config_file)
        file_task = file_values.pop("task", None)
        if task_name and file_task and file_task != task_name:
            raise UserError(
                f"config file {config_file} is for task {file_task!r}, not {task_name!r}; use jobs/{file_task}.py"
            )
        preset = preset or file_values.pop("preset", None)
        file_values.pop("preset", None)
        check_file_values(cls, file_values, config_file)
    if preset is not None:
        if preset not in presets:
            raise UserError(f"unknown config {preset!r}; choose one of: {', '.join(presets)}")
        values.update(presets[preset])
    values.update(file_values)
    values.update(overrides or {})
    return build(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------- argparse


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    prefix: str = "cfg",
    group_title: Optional[str] = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """One ``--field-name`` flag per field, raw strings defaulting to None (not given) for :func:`resolve`."""
    group = parser.add_argument_group(group_title or f"{cls.__name__} fields")
    defaults = {f.name: f.default for f in fields(cls)}
    helps: Mapping[str, str] = getattr(cls, "flag_help", {})
    for f in fields(cls):
        if f.name in exclude:
            continue
        base, _ = _unwrap_optional(_field_type(cls, f.name))
        kwargs: dict[str, Any] = dict(dest=f"{prefix}__{f.name}", default=None)
        if base is bool:
            group.add_argument(
                flag_name(f.name),
                action=argparse.BooleanOptionalAction,
                help=" ".join(filter(None, (helps.get(f.name), f"(default {defaults[f.name]})"))),
                **kwargs,
            )
        else:
            group.add_argument(
                flag_name(f.name),
                metavar=getattr(base, "__name__", "VALUE").upper(),
                help=" ".join(filter(None, (helps.get(f.name), f"(default {defaults[f.name]!r})"))),
                **kwargs,
            )


def flags_given(args: argparse.Namespace, prefix: str = "cfg") -> dict[str, Any]:
    """The ``--field`` values the user actually passed, keyed by field name."""
    head = f"{prefix}__"
    return {k[len(head) :]: v for k, v in vars(args).items() if k.startswith(head) and v is not None}


def options_given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of the options ``argv`` names however spelled, for parsers whose defaults are values."""
    actions = [a for a in parser._actions if a.default is not argparse.SUPPRESS]
    saved = [a.default for a in actions]
    for action in actions:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(list(argv), argparse.Namespace())))
    finally:
        for action, default in zip(actions, saved, strict=True):
            action.default = default
