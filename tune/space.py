"""The search space: which config fields a search varies, and how (``--space NAME=SPEC``,
which replaces the task's default entry of that field). SPEC is one of::

    0.4:1.0             uniform range (an int field draws an integer, both ends included)
    log:0.5:2           log-uniform range (both ends > 0)
    200,650             choice: one value drawn per trial
    grid:200,650        grid: every value is tried (times --num-samples)
    0.5                 a single value: pinned for every trial, not searched
    base                not searched: the base config's value

All of it is checked, with one-line errors, before any trial starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from lstm import config as cfg
from lstm.errors import UserError

RANGE_KINDS = ("uniform", "loguniform", "randint", "lograndint")
LIST_KINDS = ("choice", "grid")


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: a range (``low``/``high``) or a list of ``values``."""

    name: str
    kind: str  # uniform | loguniform | randint | lograndint | choice | grid
    values: tuple[Any, ...] = ()  # choice/grid
    low: Optional[float] = None  # ranges (inclusive for the int kinds)
    high: Optional[float] = None

    @property
    def is_range(self) -> bool:
        return self.kind in RANGE_KINDS

    @property
    def is_log(self) -> bool:
        return self.kind in ("loguniform", "lograndint")

    def to_tune(self) -> Any:
        """The Ray Tune domain (or grid) for this parameter."""
        from ray import tune as rtune

        if self.kind == "uniform":
            return rtune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return rtune.loguniform(self.low, self.high)
        if self.kind == "randint":  # Tune's upper bound is exclusive
            return rtune.randint(int(self.low), int(self.high) + 1)
        if self.kind == "lograndint":
            return rtune.lograndint(int(self.low), int(self.high) + 1)
        if self.kind == "choice":
            return rtune.choice(list(self.values))
        if self.kind == "grid":
            return rtune.grid_search(list(self.values))
        raise ValueError(f"unknown parameter kind {self.kind!r}")

    def describe(self) -> str:
        if self.is_range:
            scale = "log-" if self.is_log else ""
            what = "integer" if self.kind.endswith("randint") else "uniform"
            return f"{self.name}: {scale}{what} in [{self.low:g}, {self.high:g}]"
        verb = "every one of" if self.kind == "grid" else "one of"
        return f"{self.name}: {verb} {', '.join(_fmt(v) for v in self.values)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "values": list(self.values), "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Param":
        return cls(
            name=d["name"], kind=d["kind"], values=tuple(d.get("values") or ()), low=d.get("low"), high=d.get("high")
        )


@dataclass(frozen=True)
class SearchSpace:
    """The searched parameters, and the values pinned by ``NAME=VALUE`` entries."""

    params: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: one domain per searched field."""
        return {name: p.to_tune() for name, p in self.params.items()}

    def num_grid_points(self) -> int:
        n = 1
        for p in self.params.values():
            if p.kind == "grid":
                n *= len(p.values)
        return n

    def describe(self) -> list[str]:
        lines = [p.describe() for p in self.params.values()]
        lines += [f"{k}: fixed at {_fmt(v)}" for k, v in self.fixed.items()]
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"params": [p.to_dict() for p in self.params.values()], "fixed": dict(self.fixed)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchSpace":
        params = [Param.from_dict(p) for p in d.get("params", [])]
        return cls(params={p.name: p for p in params}, fixed=dict(d.get("fixed", {})))


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def parse_space(
    config_class: type,
    entries: Sequence[str],
    *,
    base_values: Mapping[str, Any],
    task_name: str = "",
    defaults: Optional[Mapping[str, str]] = None,
) -> SearchSpace:
    """The task's default entries overridden by ``entries``, each checked against ``base_values``' config."""
    fields_ = cfg.scalar_fields(config_class)
    specs: dict[str, tuple[str, bool]] = {n: (s, False) for n, s in (defaults or {}).items() if n in fields_}
    for entry in entries:
        name, sep, spec = entry.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UserError(
                f"--space {entry!r}: write NAME=SPEC, e.g. keep_prob=0.3:1.0, hidden_size=200,650 "
                "or learning_rate=log:0.5:2"
            )
        if name not in fields_:
            where = f" for task {task_name}" if task_name else ""
            raise UserError(
                f"--space {entry}: unknown hyperparameter {name!r}{where}; searchable: {', '.join(sorted(fields_))}"
            )
        specs[name] = (spec.strip(), True)

    params: dict[str, Param] = {}
    fixed: dict[str, Any] = {}
    for name, (spec, given) in specs.items():
        item = f"--space {name}={spec}" if given else f"default search space entry {name}={spec}"
        parsed = _parse_one(name, spec, fields_[name], item)
        if parsed is None:  # "base"
            continue
        if isinstance(parsed, Param):
            params[name] = parsed
        else:
            fixed[name] = parsed
    space = SearchSpace(params=params, fixed=fixed)
    check_against_config(config_class, space, base_values)
    if not space.params:
        raise UserError(
            "the search space is empty (nothing left to vary); add entries such as "
            "--space keep_prob=0.3:1.0 hidden_size=200,650"
        )
    return space


def _parse_one(name: str, spec: str, tp: type, item: str) -> Param | Any | None:
    if not spec:
        raise UserError(f"{item}: empty value; write LOW:HIGH, log:LOW:HIGH, V1,V2,..., grid:V1,V2 or one value")
    low_spec = spec.lower()
    if low_spec == "base":
        return None
    if low_spec.startswith("grid:"):
        return Param(name, "grid", values=_parse_list(name, spec[5:], tp, item))
    if low_spec.startswith("log:"):
        return _parse_range(name, spec[4:], tp, item, log=True)
    if ":" in spec:
        return _parse_range(name, spec, tp, item, log=False)
    if "," in spec:
        return Param(name, "choice", values=_parse_list(name, spec, tp, item))
    return _parse_scalar(name, spec, tp, item)


def _parse_scalar(name: str, raw: str, tp: type, item: str) -> Any:
    raw = raw.strip()
    if not raw:
        raise UserError(f"{item}: empty value in the list; separate values with single commas")
    try:
        value = cfg.parse_value(tp, raw, name)
    except UserError:
        kind = {int: "an integer", float: "a number"}.get(tp, f"a {tp.__name__}")
        raise UserError(f"{item}: {name} must be {kind} (got {raw!r})") from None
    if tp is float and not math.isfinite(value):
        raise UserError(f"{item}: {name} must be a finite number (got {raw!r})")
    return value


def _parse_list(name: str, spec: str, tp: type, item: str) -> tuple[Any, ...]:
    values = tuple(_parse_scalar(name, v, tp, item) for v in spec.split(","))
    if len(set(values)) != len(values):
        raise UserError(f"{item}: the list repeats a value; list each value once")
    return values


def _parse_range(name: str, spec: str, tp: type, item: str, *, log: bool) -> Param:
    if tp not in (int, float):
        raise UserError(f"{item}: {name} is a {tp.__name__} field, which has no range; list its values instead")
    parts = spec.split(":")
    if len(parts) != 2:
        raise UserError(f"{item}: a range is LOW:HIGH{' after log:' if log else ''} (two numbers)")
    low, high = (_parse_scalar(name, p, tp, item) for p in parts)
    if low > high:
        raise UserError(f"{item}: inverted range ({_fmt(low)} > {_fmt(high)}); write LOW:HIGH with LOW < HIGH")
    if low == high:
        raise UserError(
            f"{item}: empty range ({_fmt(low)}:{_fmt(high)}); give a wider range, "
            f"or pin the value with {name}={_fmt(low)}"
        )
    if log and low <= 0:
        raise UserError(f"{item}: a log range needs LOW > 0 (got {_fmt(low)})")
    kind = ("lograndint" if log else "randint") if tp is int else ("loguniform" if log else "uniform")
    return Param(name, kind, low=low, high=high)


def check_against_config(config_class: type, space: SearchSpace, base_values: Mapping[str, Any]) -> None:
    """Build the config with each value and range end, so the task's validation runs before any trial."""
    base = {**base_values, **space.fixed}
    try:
        cfg.build(config_class, base)
    except UserError as e:
        pinned = ", ".join(f"{k}={_fmt(v)}" for k, v in space.fixed.items())
        raise UserError(f"{e}{f' (with --space {pinned})' if pinned else ''}") from None
    for p in space.params.values():
        candidates = list(p.values) if not p.is_range else [p.low, p.high]
        for value in candidates:
            try:
                cfg.build(config_class, {**base, p.name: value})
            except UserError as e:
                raise UserError(f"--space {p.name}: the value {_fmt(value)} is not usable: {e}") from None
