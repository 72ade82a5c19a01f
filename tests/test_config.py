"""Configs: presets, precedence, parsing of flag values, one-line errors for bad input."""

import json

import pytest

from lstm import config as cfg
from lstm.cli import build_parser, resolve_configs
from lstm.cluster import alive_nodes, auto_cpus_per_worker
from lstm.errors import UserError
from lstm.task import get_task
from lstm.tasks.rectangle import ShapeConfig


def test_precedence_defaults_preset_file_flags(tmp_path):
    task = get_task("rectangle")
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"task": "rectangle", "preset": "mdn", "hidden_size": 16, "epochs": 3}))
    args = build_parser(task).parse_args(["--config-file", str(f), "--epochs", "4"])
    config, settings = resolve_configs(task, args)
    assert config.head == "mdn"  # from the file's preset
    assert config.hidden_size == 16  # file beats preset
    assert config.epochs == 4  # flag beats file
    assert settings.num_workers == 1


def test_values_parse_from_strings():
    assert cfg.parse_value(float, "1/1.15", "lr_decay") == pytest.approx(1 / 1.15)
    assert cfg.parse_value(tuple[int, ...], "100,500", "snapshot_at") == (100, 500)
    assert cfg.parse_value(bool, "false", "x") is False
    with pytest.raises(UserError, match="hidden_size must be an int"):
        cfg.parse_value(int, "ten", "hidden_size")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"shape": "hexagon"}, "unknown shape 'hexagon'"),
        ({"hidden_size": 0}, "--hidden-size must be positive"),
        ({"examples": -5}, "--examples must be positive"),
        ({"batch_size": 0}, "--batch-size must be positive"),
        ({"head": "gaussian"}, "--head must be dense or mdn"),
        ({"learning_rate": 0}, "--learning-rate must be positive"),
        ({"colour": "red"}, "unknown config field"),
    ],
)
def test_bad_rectangle_config_is_one_line_error(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        cfg.resolve(ShapeConfig, get_task("rectangle").presets, preset="chapter", overrides=overrides)
    assert "\n" not in str(info.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown config 'huge'; choose one of: chapter, mdn, test"):
        cfg.resolve(ShapeConfig, get_task("rectangle").presets, preset="huge")


def test_config_file_for_another_task_is_refused(tmp_path):
    f = tmp_path / "best_config.json"
    f.write_text(json.dumps({"task": "ptb", "hidden_size": 200}))
    with pytest.raises(UserError, match="is for task 'ptb'"):
        cfg.resolve(ShapeConfig, {}, config_file=str(f), task_name="rectangle")


def test_missing_and_corrupt_config_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        cfg.read_config_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        cfg.read_config_file(bad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_workers": -1}, "--num-workers"),
        ({"cpus_per_worker": -1}, "--cpus-per-worker"),
        ({"precision": "fp8"}, "--precision"),
        ({"precision": "fp16"}, "needs --gpu"),
        ({"gpus_per_worker": 0}, "--gpus-per-worker must be a fraction in"),
        ({"gpus_per_worker": 1.5}, "--gpus-per-worker must be a fraction in"),
        ({"use_gpu": True, "gpus_per_worker": 0.25, "num_workers": 2}, "two ranks of one run on the same GPU"),
    ],
)
def test_bad_run_settings(overrides, message):
    with pytest.raises(UserError, match=message):
        cfg.build(cfg.RunSettings, overrides)


def _node(cpus: int, gpus: int = 0, alive: bool = True) -> dict:
    return {
        "Alive": alive,
        "NodeManagerAddress": "10.0.0.1",
        "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})},
    }


@pytest.mark.parametrize(
    "workers, gpus_per_worker, nodes, expected",
    [
        (1, 0.0, [_node(2)], 2),  # one worker takes the whole 2-core machine
        (2, 0.0, [_node(2)], 1),
        (3, 0.0, [_node(2)], 1),  # never 0
        (2, 0.0, [_node(16), _node(16)], 16),
        (4, 0.0, [_node(8), _node(16)], 6),  # 24 CPUs over 4 workers
        (1, 0.0, [_node(8), _node(16)], 16),  # capped by the largest node
        (1, 0.0, [_node(8), _node(64, alive=False)], 8),  # dead nodes do not count
        (4, 1.0, [_node(8), _node(48, gpus=4)], 12),  # GPU workers: the GPU nodes' CPUs per GPU
        (8, 1.0, [_node(48, gpus=4), _node(16, gpus=4)], 4),
        (1, 0.25, [_node(48, gpus=4)], 3),  # a quarter of a GPU: a quarter of its CPUs
    ],
)
def test_auto_cpus_per_worker(workers, gpus_per_worker, nodes, expected):
    assert auto_cpus_per_worker(workers, gpus_per_worker, alive_nodes(nodes)) == expected
