"""The GPU cluster path without a cloud: cluster.yaml through Ray's own cluster-config code,
what a job uploads with ``--working-dir .`` (.rayignore), and the refusal of a local storage
path on a multi-node cluster."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from conftest import QUICK_COMMAND_S, REPO, own_lines

from lstm.cluster import (
    HEAD_RAY_CONFIG,
    SHARED_FILESYSTEMS,
    alive_nodes,
    check_shared_storage,
    environment,
    filesystem_type,
)
from lstm.errors import UserError
from lstm.storage import is_remote

CLUSTER_YAML = REPO / "cluster.yaml"

# vCPUs and GPUs of instance types a user is likely to pick for the worker node type.
GPU_INSTANCES = {
    "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8),
    "g6.12xlarge": (48, 4),
    "g6e.12xlarge": (48, 4),
    "g4dn.12xlarge": (48, 4),
    "p3.8xlarge": (32, 4),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}
GPU_FAMILIES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.")


def load_cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared(config: dict) -> dict:
    """What `ray up` does with the file before it talks to AWS: merge the provider's defaults,
    the setup commands and the per-type worker limits, then validate against Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def cluster() -> dict:
    return prepared(load_cluster_yaml())


def node_types(cluster: dict) -> tuple[dict, dict]:
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert len(workers) == 1, "one worker node type (GPU) expected"
    return head, workers[0]


# --------------------------------------------------------------------------- cluster.yaml


def test_ray_accepts_the_cluster_config(cluster):
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    assert cluster["auth"]["ssh_user"]
    # prepare_config merged the common setup commands into both node kinds' lists
    assert cluster["head_setup_commands"][: len(cluster["setup_commands"])] == cluster["setup_commands"]
    assert cluster["worker_setup_commands"][: len(cluster["setup_commands"])] == cluster["setup_commands"]


@pytest.mark.parametrize(
    "break_it, error",
    [
        (lambda c: c.pop("head_node_type"), "head_node_type"),
        (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), "node_config"),
        (
            lambda c: c.update(max_workers=0) or c["available_node_types"]["gpu_worker"].update(min_workers=1),
            "max_workers",
        ),
        (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), "0.5"),
        (lambda c: c.update(setup_commandz=[]), "setup_commandz"),
    ],
)
def test_the_validation_fails_when_the_config_breaks(break_it, error):
    config = load_cluster_yaml()
    break_it(config)
    with pytest.raises(Exception, match=error):
        prepared(config)


def test_gpu_workers_have_gpus_and_the_head_has_none(cluster):
    head, gpu = node_types(cluster)
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    assert head["max_workers"] == 0
    instance = gpu["node_config"]["InstanceType"]
    assert instance.startswith(GPU_FAMILIES), f"{instance} is not a GPU instance type"
    assert gpu["resources"]["GPU"] >= 1
    if instance in GPU_INSTANCES:  # the declared resources are what the instance has
        assert (gpu["resources"]["CPU"], gpu["resources"]["GPU"]) == GPU_INSTANCES[instance]
    assert gpu["min_workers"] <= gpu["max_workers"] <= cluster["max_workers"]
    # a Tune search sizes itself to the GPUs present when it starts (tune.runner.check_resources)
    assert gpu["min_workers"] >= 1, "with no GPU node up, `jobs/search.py --gpu` finds no GPU"


def test_a_gpu_search_fits_the_cluster_at_its_minimum_size(cluster, tmp_path):
    """What `jobs/search.py --gpu --workers-per-trial 2` finds right after `ray up`."""
    from lstm.cluster import Node
    from tune import cli, runner

    head, gpu = node_types(cluster)
    nodes = [Node("head", dict(head["resources"]))]
    nodes += [Node(f"gpu{i}", dict(gpu["resources"])) for i in range(gpu["min_workers"])]
    gpus = sum(n.resources.get("GPU", 0) for n in nodes)
    argv = [
        "--task",
        "rectangle",
        "--base",
        "test",
        "--gpu",
        "--workers-per-trial",
        "2",
        "--storage-path",
        str(tmp_path),
    ]
    spec = cli.spec_from_args(cli.build_parser().parse_args(argv))
    assert runner.check_resources(spec, nodes) == min(gpus // 2, spec.num_trials) >= 1


def test_setup_installs_cuda_torch_then_the_project(cluster):
    for commands in (cluster["head_setup_commands"], cluster["worker_setup_commands"]):
        text = "\n".join(commands)
        torch_at = next(i for i, c in enumerate(commands) if re.search(r"pip install .*\btorch\b", c))
        assert re.search(r"download\.pytorch\.org/whl/cu\d+", commands[torch_at]), "not the CUDA build of torch"
        project_at = next(i for i, c in enumerate(commands) if re.search(r"pip install .*-e ~/lstm-ray", c))
        assert torch_at < project_at, "torch must be installed before the project (which leaves it unpinned)"
        import ray

        assert f"ray[default,train,tune]=={ray.__version__}" in text, "the cluster's Ray must match this one"
    assert any("boto3" in c for c in cluster["head_setup_commands"]), "the autoscaler needs boto3 on the head"


def test_the_repo_is_mounted_where_the_install_command_looks(cluster):
    mounts = cluster["file_mounts"]
    for remote, local in mounts.items():
        if remote.startswith("~/lstm-ray/"):
            assert (REPO / local).exists(), f"file_mounts: {local} is not in the repository"
            assert remote == f"~/lstm-ray/{local}"
    mounted = {local for remote, local in mounts.items() if remote.startswith("~/lstm-ray/")}
    assert {"pyproject.toml", "lstm", "tune"} <= mounted  # what `pip install -e` builds


def test_runs_go_to_shared_storage_named_by_lstm_ray_storage(cluster):
    exports = [
        m.group(1)
        for c in cluster["setup_commands"]
        for m in re.finditer(r"echo 'export LSTM_RAY_STORAGE=([^'\s]+)'", c)
    ]
    assert len(exports) == 1, "setup_commands should export LSTM_RAY_STORAGE once"
    assert is_remote(exports[0]), f"LSTM_RAY_STORAGE={exports[0]} is not shared storage"
    # the nodes can write there: the workers get an instance profile (the head gets one from `ray up`)
    _, gpu = node_types(cluster)
    assert gpu["node_config"].get("IamInstanceProfile")


def test_token_auth_reaches_every_node_the_way_rays_docs_say(cluster):
    # the local token file goes to every node ...
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # ... and token mode is on in every shell (initialization_commands) and for `ray start` itself
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in cluster["initialization_commands"])
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    # the jobs API is reached through `ray dashboard`'s SSH tunnel, not an open port
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--dashboard-port=8265" in head_start


def test_the_head_starts_with_the_dashboards_wait_for_a_dead_workers_last_events(cluster):
    """cluster.yaml's head gets lstm/cluster.py's HEAD_RAY_CONFIG, each a setting Ray reads from
    the environment (a misspelt one would be ignored)."""
    head_start = " ".join(c for c in cluster["head_start_ray_commands"] if "ray start --head" in c)
    assert all(f"{name}={value} " in head_start for name, value in HEAD_RAY_CONFIG.items())
    settings = [name.removeprefix("RAY_") for name in HEAD_RAY_CONFIG]
    code = f"import ray; print([getattr(ray._config, name)() for name in {settings!r}])"
    env = {**os.environ, **HEAD_RAY_CONFIG}
    command = [sys.executable, "-c", code]
    read = subprocess.run(command, env=env, capture_output=True, text=True, timeout=QUICK_COMMAND_S)
    assert read.stdout.strip() == str([int(value) for value in HEAD_RAY_CONFIG.values()]), read.stderr[-2000:]


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    for pattern in (
        r"AKIA[0-9A-Z]{16}",
        r"(?i)aws_secret_access_key",
        r"(?i)aws_access_key_id",
        r"RAY_AUTH_TOKEN=\S",
        r"(?i)password",
    ):
        assert not re.search(pattern, text), pattern


def test_every_edit_marker_is_explained_at_the_top():
    text = CLUSTER_YAML.read_text()
    header = text.split("\ncluster_name:")[0]
    assert text.count("# EDIT") >= 5
    for what in ("region", "ImageId", "LSTM_RAY_STORAGE", "InstanceType", "CUDA"):
        assert what in header, f"the header does not say to edit {what}"


# --------------------------------------------------------------------------- what a job uploads


def test_rayignore_keeps_data_runs_and_environments_out_of_the_job_package(tmp_path):
    """Ray's own packaging code (as `ray job submit --working-dir .` runs it) on a copy of the
    layout a user has, with .gitignore switched off (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and
    none of Ray's default excludes: .rayignore alone keeps the package small."""
    from ray._private.runtime_env.packaging import create_package

    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / ".rayignore", root / ".rayignore")
    wanted = ["jobs/ptb.py", "lstm/data/ptb.py", "lstm/trainer.py", "tune/cli.py", "pyproject.toml"]
    unwanted = [
        ".git/objects/pack/big.pack",
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
        "venv/bin/python",
        "runs/ptb-1/checkpoint_000001/model.pt",
        "data/ptb/ptb.train.txt",
        "simple-examples/data/ptb.train.txt",
        "simple-examples.tgz",
        "lstm/__pycache__/x.cpython-311.pyc",
        "lstm_ray.egg-info/PKG-INFO",
        "tests/runs/old/results.json",
    ]
    for rel in wanted + unwanted:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 1000)
    package = tmp_path / "package.zip"
    create_package(str(root), package, include_gitignore=False, excludes=[])
    names = set(zipfile.ZipFile(package).namelist())
    assert set(wanted) <= names, "the code a job runs must be uploaded"
    assert not names & set(unwanted), f"uploaded: {sorted(names & set(unwanted))}"


# --------------------------------------------------------------------------- multi-node storage


def nodes(*addresses, alive=True):
    return alive_nodes(
        [
            {"NodeID": f"n{i}", "Alive": alive, "NodeManagerAddress": a, "Resources": {"CPU": 2.0}}
            for i, a in enumerate(addresses)
        ]
    )


def test_a_local_storage_path_is_refused_on_a_multi_node_cluster(tmp_path):
    with pytest.raises(UserError) as e:
        check_shared_storage(str(tmp_path), nodes("10.0.0.1", "10.0.0.2"))
    message = str(e.value)
    assert "\n" not in message
    assert message == (
        f"storage path {tmp_path} is local but this Ray cluster has 2 nodes; pass --storage-path "
        "s3://bucket/prefix (or a folder on shared storage such as NFS mounted on every node)"
    )


@pytest.mark.parametrize("path", ["s3://bucket/lstm-ray", "gs://bucket/runs", "abfs://container@account/runs"])
def test_shared_storage_uris_pass_on_a_multi_node_cluster(path):
    check_shared_storage(path, nodes("10.0.0.1", "10.0.0.2"))


def test_a_local_path_is_fine_on_one_node(tmp_path):
    check_shared_storage(str(tmp_path), nodes("10.0.0.1"))
    check_shared_storage(str(tmp_path), nodes("10.0.0.1", "10.0.0.1"))  # two raylets, one machine
    check_shared_storage(str(tmp_path), nodes("10.0.0.1", "10.0.0.2", alive=False))  # dead nodes do not count


def test_a_folder_on_a_network_filesystem_is_shared(monkeypatch, tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared\\040runs nfs4 rw 0 0\n"
        "tmpfs /mnt/shared\\040runs/tmp tmpfs rw 0 0\n"
    )
    assert filesystem_type("/mnt/shared runs/lstm", str(mounts)) == "nfs4"
    assert filesystem_type("/mnt/shared runs", str(mounts)) == "nfs4"
    assert filesystem_type("/mnt/shared runs/tmp/x", str(mounts)) == "tmpfs"
    assert filesystem_type("/mnt/sharedruns", str(mounts)) == "ext4"
    assert filesystem_type("/x", str(tmp_path / "no-such-file")) == ""
    assert "nfs4" in SHARED_FILESYSTEMS and "ext4" not in SHARED_FILESYSTEMS

    import lstm.cluster as cluster

    monkeypatch.setattr(cluster, "filesystem_type", lambda path: "nfs4")
    check_shared_storage("/mnt/shared runs/lstm", nodes("10.0.0.1", "10.0.0.2"))


def test_the_job_refuses_a_local_path_before_training(monkeypatch, tmp_path, capsys):
    """The whole command line (jobs/rectangle.py), as on a two-node cluster: one line, exit 2,
    nothing written."""
    import lstm.cluster as cluster
    import lstm.trainer as trainer
    from lstm.cli import train_main
    from lstm.errors import run_cli

    monkeypatch.setattr(cluster, "alive_nodes", lambda: nodes("10.0.0.1", "10.0.0.2"))
    monkeypatch.setattr(cluster, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "make_trainer", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as e:
        run_cli(
            lambda argv: train_main("rectangle", argv),
            ["--config", "test", "--storage-path", str(tmp_path / "runs"), "--name", "r"],
        )
    assert e.value.code == 2
    err = own_lines(capsys.readouterr().err)
    assert err == [
        f"error: storage path {tmp_path / 'runs'} is local but this Ray cluster has 2 nodes; pass "
        "--storage-path s3://bucket/prefix (or a folder on shared storage such as NFS mounted on every node)"
    ]
    assert not (tmp_path / "runs").exists()


def test_the_environment_given_to_a_local_instance_is_undone_in_the_driver(monkeypatch):
    """lstm.cluster.environment: set while Ray starts its processes, then each variable as it
    was (changed ones back, new ones gone), an error in the body included."""
    monkeypatch.setenv("LSTM_TEST_CHANGED", "before")
    monkeypatch.delenv("LSTM_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError), environment({"LSTM_TEST_CHANGED": "during", "LSTM_TEST_NEW": "during"}):
        assert os.environ["LSTM_TEST_CHANGED"] == os.environ["LSTM_TEST_NEW"] == "during"
        raise RuntimeError("ray.init failed")
    assert os.environ["LSTM_TEST_CHANGED"] == "before" and "LSTM_TEST_NEW" not in os.environ
