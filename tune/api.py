"""``tune.search``: a Ray Tune search from Python, as ``jobs/search.py`` runs it from a shell.

The keywords are the command line's flags (``num_samples=6`` is ``--num-samples 6``), checked
by the same code (:func:`tune.cli.search_from_args`), so bad input raises
:class:`lstm.UserError` with the line the command prints. ``space`` takes the ``--space``
strings, or a dict of Ray Tune domains (``ray.tune.uniform(0.3, 1.0)``, ``ray.tune.choice``,
``ray.tune.grid_search``, ...), turned into those strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from lstm import checkpoint as ckpt
from lstm import storage
from lstm.errors import UserError
from tune import cli, report
from tune.runner import SearchOutcome

SpaceLike = Union[None, str, Sequence[str], Mapping[str, Any]]


@dataclass
class SearchResult:
    """A finished search: what :func:`search` returns."""

    folder: str  # the search's folder (local path or URI)
    rows: list[dict[str, Any]]  # one per trial, best first: the results table (results.csv)
    best_config: Optional[dict[str, Any]]  # best_config.json: `lstm.train(task, config=result.best_config)`
    best_trial: Optional[str]  # the best trial's id
    best_checkpoint: Optional[str]  # its newest checkpoint: `lstm.load(result.best_checkpoint)`
    wall_time_s: float
    files: dict[str, str] = field(default_factory=dict)  # results.md, best_config.json, plots, ...

    def dataframe(self) -> Any:
        """:attr:`rows` as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)


def spec_string(name: str, domain: Any) -> str:
    """A ``--space`` entry for one Ray Tune domain (or a plain value, or a SPEC string)."""
    from ray.tune.search.sample import Categorical, Float, Integer

    if isinstance(domain, Mapping) and set(domain) == {"grid_search"}:
        return f"{name}=grid:" + ",".join(str(v) for v in domain["grid_search"])
    if isinstance(domain, Categorical):
        return f"{name}=" + ",".join(str(v) for v in domain.categories)
    if isinstance(domain, (Float, Integer)):
        sampler = type(domain.get_sampler()).__name__
        if sampler not in ("_Uniform", "_LogUniform"):
            raise UserError(
                f"space {name}: Ray Tune's {sampler.strip('_')} sampling has no --space form; use tune.uniform, "
                "tune.loguniform, tune.randint, tune.lograndint, tune.choice or tune.grid_search"
            )
        low, high = (
            domain.lower,
            domain.upper - 1 if isinstance(domain, Integer) else domain.upper,
        )  # randint: exclusive
        return f"{name}={'log:' if sampler == '_LogUniform' else ''}{low}:{high}"
    if isinstance(domain, float) and not math.isfinite(domain):
        raise UserError(f"space {name}: {domain} is not a value a config takes")
    return f"{name}={domain}"


def space_strings(space: SpaceLike) -> list[str]:
    """``space`` as the ``--space`` entries of the command line."""
    if space is None:
        return []
    if isinstance(space, str):
        return [space]
    if isinstance(space, Mapping):
        return [spec_string(name, domain) for name, domain in space.items()]
    return list(space)


def outcome_result(outcome: SearchOutcome) -> SearchResult:
    """What a finished search's report says, as a :class:`SearchResult`."""
    spec, rep = outcome.spec, outcome.report
    header, cells = report.table(rep.rows, rep.params, rep.metric, rep.mode)
    best = rep.best
    best_dir = report.trial_run_dir(spec, best.trial_id) if best else None
    best_config = storage.read_json(rep.files["best_config"]) if "best_config" in rep.files else None
    return SearchResult(
        folder=spec.experiment_dir,
        rows=[dict(zip(header, row, strict=True)) for row in cells],
        best_config=best_config,
        best_trial=best.trial_id if best else None,
        best_checkpoint=ckpt.latest(best_dir) if best_dir and ckpt.has_checkpoints(best_dir) else None,
        wall_time_s=outcome.wall_time_s,
        files=dict(rep.files),
    )


def search(
    task: str = "ptb",
    *,
    base: Optional[str] = None,
    space: SpaceLike = None,
    scheduler: Optional[str] = None,
    search_alg: Optional[str] = None,
    num_samples: Optional[int] = None,
    max_epochs: Optional[int] = None,
    **options: Any,
) -> SearchResult:
    """Search ``task``'s hyperparameters with Ray Tune (ASHA or PBT; random or TPE) and return the result.

    ``base``: the preset trials start from; ``space``: ``--space`` strings or a dict of Ray
    Tune domains (None: the task's default space); ``search_alg``: "random" (default) or "tpe"
    (Optuna's TPE; not with PBT or grids); ``options``: the other flags of ``jobs/search.py`` by
    their names (``train_fraction``, ``workers_per_trial``, ...)."""
    named = {
        "base": base,
        "scheduler": scheduler,
        "search_alg": search_alg,
        "num_samples": num_samples,
        "max_epochs": max_epochs,
    }
    keywords = {**{k: v for k, v in named.items() if v is not None}, **options}
    if space is not None:
        keywords["space"] = space_strings(space)
    args = cli.build_parser().parse_args([])
    unknown = sorted(set(keywords) - set(vars(args)))
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for tune.search; pass the flags of jobs/search.py "
            f"by their names ({', '.join(sorted(vars(args)))})"
        )
    for key, value in {"task": task, **keywords}.items():
        setattr(args, key, value)
    return outcome_result(cli.search_from_args(args, set(keywords)))
