"""cluster.yaml: valid for Ray's own autoscaler schema, and in step with the project."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared(config: dict) -> dict:
    """The config as `ray up` sees it: merged with the provider's defaults, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def constraint_pin(package: str) -> str:
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    return pins[package]


def environment(config: dict) -> dict[str, str]:
    """NAME=VALUE lines the setup commands write to the nodes' environment file."""
    for command in config["setup_commands"]:
        if "> ~/.clusterattack/env" in command:
            words = shlex.split(command.split("printf", 1)[1].split(">", 1)[0])
            return dict(word.split("=", 1) for word in words[1:])
    raise AssertionError("no setup command writes ~/.clusterattack/env")


def gpu_worker_types(config: dict) -> dict[str, dict]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if node.get("resources", {}).get("GPU", 0) > 0
    }


def test_valid_for_the_autoscaler_schema():
    config = prepared(load())
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_schema_check_is_real():
    """The same validation refuses a misspelt field and a worker type without node_config."""
    from ray.autoscaler._private.util import validate_config

    bad = prepared(load())
    bad["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(bad)
    bad = prepared(load())
    del bad["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        validate_config(bad)


def test_head_on_cpu_and_an_autoscaling_gpu_worker_type():
    config = load()
    head = config["available_node_types"][config["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    workers = gpu_worker_types(config)
    assert workers, "no worker node type offers a GPU"
    for name, node in workers.items():
        assert node["min_workers"] == 0, f"{name} should scale down to nothing"
        assert node["max_workers"] >= 1, f"{name} can never start a worker"
        assert node["max_workers"] <= config["max_workers"], f"{name} may exceed the cluster's max_workers"
        # A GPU instance family: g4dn/g5/g6/p3/p4/p5...
        assert re.match(r"^(g\d|p\d)", node["node_config"]["InstanceType"]), node["node_config"]


def test_project_is_installed_with_its_constraints():
    config = prepared(load())
    mounts = config["file_mounts"]
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "clusterattack", "jobs"):
        remote = f"~/clusterattack/{needed}"
        assert remote in mounts, f"{needed} is not synced to the nodes"
        assert (ROOT / mounts[remote]).exists(), f"{mounts[remote]} does not exist locally"
    for kind in ("head_setup_commands", "worker_setup_commands"):
        commands = config[kind]
        install = [c for c in commands if "-e ~/clusterattack" in c]
        assert install and "-c ~/clusterattack/constraints.txt" in install[-1], f"{kind}: {commands}"
        # torch first, at the pinned version, then the project (which keeps that build).
        torch_at = [i for i, c in enumerate(commands) if re.search(r"install .*\btorch==", c)]
        assert torch_at and torch_at[0] < commands.index(install[-1]), f"{kind}: {commands}"
        pinned = re.search(r"\btorch==(\S+)", commands[torch_at[0]]).group(1)
        assert pinned == constraint_pin("torch"), f"{kind} installs torch {pinned}"


def test_gpu_nodes_get_a_cuda_build_and_the_head_a_cpu_build():
    config = load()
    head = " ".join(config["head_setup_commands"])
    assert "download.pytorch.org/whl/cpu" in head
    workers = config["worker_setup_commands"]
    assert not any("whl/cpu" in c for c in workers), workers
    assert any("torch.version.cuda" in c and "torch.cuda.is_available()" in c for c in workers)


def test_ray_is_started_with_metrics_on_a_fixed_port():
    config = load()
    head = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1 and "--head" in head[0]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head[0]
    assert len(workers) == 1 and "--address=$RAY_HEAD_IP:6379" in workers[0]
    for command in head + workers:
        assert "--metrics-export-port=8080" in command


def test_environment_names_mlflow_s3_and_token_auth():
    config = load()
    env = environment(config)
    assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    assert env["AWS_DEFAULT_REGION"] == config["provider"]["region"]
    assert env["RAY_AUTH_MODE"] == "token"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Every node sources the file before Ray starts (Ray's login shells read ~/.bashrc).
    assert any(".clusterattack/env" in c and ".bashrc" in c for c in config["setup_commands"])
    # The variables are ones the project (or MLflow/boto3) reads.
    source = "\n".join(p.read_text() for p in (ROOT / "clusterattack").rglob("*.py"))
    for name in env:
        assert name in source or name.startswith(("AWS_", "RAY_")), f"{name} is read by nothing"
