"""bench/ptb_speed.py keeps working: its FLOP and parameter counts, its one-line errors, and one
tiny run end to end (the job's own step, the matmul stand-in, a 2-process gloo all-reduce)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lstm import config as cfg
from lstm.errors import UserError
from lstm.tasks.ptb_config import PRESETS, PTBConfig

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import allreduce  # noqa: E402
import op_split  # noqa: E402
import ptb_speed  # noqa: E402
import step_flops  # noqa: E402


def preset(name: str) -> PTBConfig:
    return cfg.resolve(PTBConfig, PRESETS, preset=name)


@pytest.mark.parametrize("name,per_word", [("small", 15_840_000), ("medium", 79_560_000), ("large", 306_000_000)])
def test_flops_per_word_are_6HV_plus_48LH2(name, per_word):
    assert step_flops.flops_per_word(preset(name)) == per_word


def test_parameter_counts_are_the_models():
    c = preset("medium")
    v, h, layers = c.vocab_size, c.hidden_size, c.num_layers
    assert allreduce.param_count(c) == 2 * v * h + v + layers * (8 * h * h + 8 * h) == 19_780_400


@pytest.mark.parametrize("device", ["gpu", "xla", "cuda:x"])
def test_a_bad_device_is_one_line(device):
    with pytest.raises(UserError) as e:
        ptb_speed.device_arg(device)
    assert "\n" not in str(e.value) and "--device" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(UserError, match="sees no CUDA device; use --device cpu"):
        ptb_speed.device_arg("cuda")


def test_compiled_on_cpu_is_one_line_before_any_work():
    with pytest.raises(UserError, match="--compiled times CUDA graphs"):
        ptb_speed.main(["--device", "cpu", "--compiled", "--data-dir", "/nonexistent"])


def test_profile_steps_on_a_gpu_is_one_line_before_any_work():
    with pytest.raises(UserError, match="--profile-steps splits a CPU step"):
        ptb_speed.main(["--device", "cuda", "--profile-steps", "2", "--data-dir", "/nonexistent"])


def test_op_split_groups_the_step_and_its_shares_add_up():
    us = {"aten::addmm": 500.0, "aten::mm": 1000.0, "aten::mkldnn_rnn_layer": 300.0, "MkldnnRnnLayerBackward0": 100.0}
    us |= {"aten::_softmax": 60.0, "aten::add_": 30.0, "aten::copy_": 10.0}
    s = op_split.split(us, steps=2)
    assert s["share"] == {"matrix products": 0.75, "LSTM kernels": 0.2, "other": 0.05}
    assert s["ms_per_step"] == 1.0 and s["ms_per_step_by_group"]["LSTM kernels"] == 0.2
    assert list(s["other_top_share"]) == ["aten::_softmax", "aten::add_", "aten::copy_"] and s["other_ops"] == 3


def test_a_tiny_run_prints_one_json_line(ptb_dir, capsys):
    args = ["--config", "test", "--steps", "1", "--repeats", "2", "--threads", "1", "--eval-words", "2000"]
    args += ["--profile-steps", "2"]
    assert (
        ptb_speed.main([*args, "--data-dir", str(ptb_dir), "--allreduce-configs", "test", "--allreduce-iters", "1"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["captured"] == "cuda only" and result["params"] == allreduce.param_count(preset("test"))
    assert set(result["warmup_s"]) == {"reference", "job", "matmul"} and "compiled_words_per_sec" not in result
    for key in ("job_words_per_sec", "reference_words_per_sec", "step_ms", "matmul_fraction", "allreduce_ms"):
        assert result[key] > 0, key
    split = result["op_split"]  # the job's real step: products, oneDNN's LSTM kernels, and the rest
    assert split["profiled_steps"] == 2 and all(split["share"][g] > 0 for g in split["share"])
    assert abs(sum(split["share"].values()) - 1) < 0.01 and "aten::_softmax" in split["other_top_share"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_short_cuda_run_replays_every_graph(ptb_dir, capsys):
    """On a GPU, at small's shapes: the captured job step, the compiled loop and the matmul
    stand-in each capture or record a CUDA graph in one process and replay it (the stand-in
    captures on a warmed stream of its own at its first run: on the default capture stream,
    after the other trainers' captures, its replay faulted)."""
    args = ["--device", "cuda", "--config", "small", "--steps", "2", "--repeats", "2", "--eval-words", "2000"]
    assert ptb_speed.main([*args, "--compiled", "--allreduce-iters", "0", "--data-dir", str(ptb_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["captured"] == "captured in a CUDA graph"
    assert set(result["warmup_s"]) == {"reference", "compiled", "job", "captured", "matmul"}
    for key in ("captured_words_per_sec", "compiled_words_per_sec", "captured_matmul_fraction", "matmul_fraction"):
        assert result[key] > 0, key


def test_run_overhead_names_each_process_it_counts():
    import run_overhead

    def group(cmdline, pid=7):
        return run_overhead.process_group(cmdline, driver_pid=1, pid=pid)

    assert group("python jobs/ptb.py --config test", pid=1) == "driver"
    assert group("ray::RayTrainWorker") == "RayTrainWorker"
    assert group("ray::TrainController.run") == "TrainController"
    assert group("ray::IDLE") == "idle_worker"
    assert group("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x") == "raylet"
    assert group("/venv/bin/python /venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py --port=8265") == (
        "dashboard"
    )
    assert group("/usr/bin/sshd -D") == "other"


def test_run_overhead_counts_the_cpu_a_process_spends_while_it_runs():
    """A child that spends 0.3 s of CPU once the sampler runs, then sleeps: the sampler's last
    reading (taken by ``stop``) counts at least that, under "driver"."""
    import subprocess

    import run_overhead

    burn = "\n".join(
        [
            "import sys, time",
            "sys.stdin.readline()",
            "t = time.process_time()",
            "while time.process_time() - t < 0.3: pass",
            "print('done', flush=True)",
            "time.sleep(60)",
        ]
    )
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        sampler = run_overhead.CpuSampler(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        cpu = sampler.stop()
    finally:
        child.kill()
        child.wait()
    assert cpu["driver"] >= 0.28  # /proc counts in ticks of 10 ms
