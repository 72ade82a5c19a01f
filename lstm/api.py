"""The Python API: :func:`train` a task, :func:`load` a trained run (``tune.search`` is the
search's). The jobs are layers over it: their flags become :func:`resolve_run`'s arguments,
so a keyword is checked as its flag is and raises :class:`lstm.UserError` with the line the
job prints. :func:`train` joins the caller's Ray, or the cluster a plain ``ray.init()`` would
join, or starts a local instance it leaves running.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Mapping, Optional, Union

from lstm import config as cfg
from lstm.errors import UserError
from lstm.outputs import Run
from lstm.task import Task, get_task

# What ``config=`` may be: a preset name, a dict of fields, a config object, or the path of a
# JSON file of fields (a search's best_config.json); None is the task's default preset.
ConfigLike = Union[None, str, "os.PathLike[str]", Mapping[str, Any], cfg.TaskConfig]

# The run options, by keyword: RunSettings' fields, as the flags name them (--gpu: gpu=True).
RUN_KEYWORDS = {"gpu": "use_gpu", **{f.name: f.name for f in fields(cfg.RunSettings) if f.name != "use_gpu"}}


def config_source(task: type[Task], config: ConfigLike) -> tuple[Optional[str], Optional[str], dict[str, Any]]:
    """``config`` as (preset, config file, field values), the parts :func:`resolve_run` merges."""
    if config is None:
        return task.default_preset, None, {}
    if isinstance(config, cfg.TaskConfig):
        if not isinstance(config, task.config_class):
            raise UserError(
                f"config is a {type(config).__name__}, not a {task.config_class.__name__} of task {task.name}; "
                f"pass the task's own config, a preset name, a dict of fields or a JSON file"
            )
        return None, None, cfg.to_dict(config)
    if isinstance(config, Mapping):  # as a config file holds it: fields, maybe "task" and "preset"
        values = dict(config)
        named_task = values.pop("task", task.name)
        if named_task != task.name:
            raise UserError(
                f"config is for task {named_task!r}, not {task.name!r}; train it as lstm.train({named_task!r}, ...)"
            )
        return values.pop("preset", None) or task.default_preset, None, values
    if isinstance(config, (str, os.PathLike)):
        name = os.fspath(config)
        if name in task.presets or not (name.endswith(".json") or os.path.sep in name or os.path.exists(name)):
            return name, None, {}  # a preset (an unknown name is refused by cfg.resolve)
        return None, name, {}
    raise UserError(
        f"config must be a preset name, a dict of fields, a {task.config_class.__name__} or a JSON file's path "
        f"(got a {type(config).__name__})"
    )


def resolve_run(
    task: type[Task],
    *,
    preset: Optional[str] = None,
    config_file: Optional[str] = None,
    values: Mapping[str, Any] = {},  # noqa: B006 - read only
    overrides: Mapping[str, Any] = {},  # noqa: B006 - read only
    run_options: Mapping[str, Any] = {},  # noqa: B006 - read only
    resume: bool = False,
) -> tuple[cfg.TaskConfig, cfg.RunSettings]:
    """The checked task config (defaults <- preset <- file <- values <- overrides) and run settings."""
    config = cfg.resolve(
        task.config_class,
        task.presets,
        preset=preset,
        config_file=config_file,
        overrides={**values, **overrides},
        task_name=task.name,
    )
    settings = cfg.build(cfg.RunSettings, run_options, source="run setting")
    cfg.refuse_unused({*overrides, *run_options}, {**config.unused_flags(), **settings.unused_flags()})
    if resume and not settings.name:
        raise UserError("--resume needs the --name of the run to continue; add --name NAME")
    return config, settings


def split_options(task: type[Task], options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keywords as (config field overrides, run settings); an unknown keyword is a UserError."""
    fields_ = {f.name for f in fields(task.config_class)}
    overrides = {k: v for k, v in options.items() if k in fields_}
    run_options = {RUN_KEYWORDS[k]: v for k, v in options.items() if k in RUN_KEYWORDS and k not in fields_}
    unknown = sorted(set(options) - set(overrides) - {k for k in options if k in RUN_KEYWORDS})
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for task {task.name}; pass a field of "
            f"{task.config_class.__name__} ({', '.join(sorted(fields_))}) or a run option ({', '.join(RUN_KEYWORDS)})"
        )
    return overrides, run_options


def train(task: str, config: ConfigLike = None, *, resume: bool = False, **options: Any) -> Run:
    """Train ``task`` ("ptb", "char", "rectangle") on Ray Train workers and return the run.

    ``config``: a preset name, a dict of fields, a config object or a JSON file's path (None:
    the default preset). ``options``: any config field and the job's run flags by their names
    (``num_workers``, ``gpu``, ``storage_path``, ``name``, ...; docs/api.md lists them).
    ``resume=True`` continues the run ``name`` from its newest checkpoint."""
    from lstm.trainer import fit

    task_class = get_task(task)
    overrides, run_options = split_options(task_class, options)
    preset, config_file, values = config_source(task_class, config)
    config_obj, settings = resolve_run(
        task_class,
        preset=preset,
        config_file=config_file,
        values=values,
        overrides=overrides,
        run_options=run_options,
        resume=resume,
    )
    return fit(task_class.name, config_obj, settings, resume=resume)


# --------------------------------------------------------------------------- a trained run, loaded


class Model:
    """A trained run's model in this process (no Ray needed), what :func:`load` returns."""

    task: str

    def __init__(self, trained: Any):
        self.trained = trained

    @property
    def config(self) -> cfg.TaskConfig:
        return self.trained.config


class WordModel(Model):
    """A PTB run: ``score`` a text, ``generate`` from a prompt (``jobs/ptb.py score|generate``)."""

    task = "ptb"

    def score(self, text: str, batch_size: int = 1) -> dict[str, Any]:
        """The figures of ``jobs/ptb.py score`` for ``text`` (the text itself, not a path)."""
        from lstm.data import ptb
        from lstm.tasks import ptb_trained

        words = ptb_trained.enough_words(ptb.tokenize(text), "the text")
        return ptb_trained.score_words(self.trained, words, batch_size, text="")

    def generate(self, prompt: str, length: int = 50, temperature: float = 1.0, seed: int = 0) -> str:
        """``length`` words after ``prompt``, each ``<eos>`` a line break (``jobs/ptb.py generate``)."""
        from lstm.tasks import ptb_trained

        words = ptb_trained.generate_words(self.trained, prompt, length=length, temperature=temperature, seed=seed)
        return ptb_trained.render(words)


class CharModel(Model):
    """A char run: ``sample`` a continuation (``jobs/char.py sample``)."""

    task = "char"

    def sample(self, seed_text: str, temperature: float = 0.5, length: int = 400, seed: int = 0) -> str:
        from lstm.tasks import char_trained

        return char_trained.sample(self.trained, seed_text, temperature=temperature, length=length, seed=seed)


class ShapeModel(Model):
    """A rectangle run: ``draw`` shapes point by point."""

    task = "rectangle"

    def draw(self, n: int = 6, sample: bool = True, seed: int = 0) -> list[list[list[float]]]:
        from lstm.tasks import rectangle_trained

        return rectangle_trained.draw(self.trained, n, sample=sample, seed=seed)


def load(checkpoint: Union[str, "os.PathLike[str]"]) -> Model:
    """A trained run's model: ``checkpoint`` is a run folder, a ``checkpoint_*`` folder, or an s3:// URI of either."""
    from lstm import checkpoint as ckpt
    from lstm.tasks import char_trained, ptb_trained, rectangle_trained

    contents = ckpt.load(checkpoint, label="load", optimizer=True)  # PTB's NT-ASGD averages are in the optimizer
    task = contents.state["task"]
    loaders = {
        "ptb": (ptb_trained, WordModel),
        "char": (char_trained, CharModel),
        "rectangle": (rectangle_trained, ShapeModel),
    }
    if task not in loaders:
        raise UserError(f"{contents.location} is a checkpoint of task {task!r}, which lstm.load does not know")
    module, model_class = loaders[task]
    return model_class(module.trained_from(contents))
