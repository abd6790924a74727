import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_config

ROOT = Path(__file__).parents[1]


CLUSTER = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def commands(key: str) -> list[list[str]]:
    """The shell commands of ``key``, each split into words (``a || b`` into two)."""
    split = []
    for line in CLUSTER[key]:
        for part in line.split("||"):
            split.append(shlex.split(part))
    return split


def test_cluster_yaml_has_a_cpu_head_and_scaling_single_gpu_workers():
    assert set(CLUSTER) >= {
        "cluster_name", "max_workers", "provider", "auth", "head_node_type",
        "available_node_types", "file_mounts", "setup_commands", "head_setup_commands",
        "head_start_ray_commands", "worker_start_ray_commands",
    }  # fmt: skip
    types = CLUSTER["available_node_types"]
    assert set(types) == {"head_cpu", "gpu_worker"} and CLUSTER["head_node_type"] == "head_cpu"
    assert types["head_cpu"]["resources"] == {"CPU": 8, "GPU": 0}
    worker = types["gpu_worker"]
    assert worker["resources"] == {"CPU": 8, "GPU": 1}  # one member per GPU
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 3  # three members at once
    assert CLUSTER["max_workers"] >= worker["max_workers"]
    assert CLUSTER["provider"]["type"] == "aws"


def test_every_node_mounts_the_shared_storage_and_installs_psat():
    assert CLUSTER["file_mounts"] == {
        "~/psat": ".",
        "~/.ray/auth_token": "~/.ray/auth_token",
    }
    setup = commands("setup_commands")
    mount = next(words for words in setup if words[:2] == ["sudo", "mount"])
    assert mount[mount.index("-t") + 1] == "nfs4" and mount[-1] == "/mnt/psat"
    assert ["mountpoint", "-q", "/mnt/psat"] in setup  # idempotent on a restarted node
    assert ["python3", "-m", "pip", "install", "~/psat"] in setup  # not -e: the pinned deps


def test_the_head_runs_mlflow_on_the_shared_storage():
    server = next(words for words in commands("head_setup_commands") if "server" in words)
    assert server[:3] == ["nohup", "mlflow", "server"]
    option = {
        server[i]: server[i + 1] for i in range(len(server) - 1) if server[i].startswith("--")
    }
    assert option["--host"] == "0.0.0.0" and option["--port"] == "5000"
    assert option["--backend-store-uri"] == "sqlite:////mnt/psat/mlflow.db"
    assert option["--artifacts-destination"] == "/mnt/psat/mlartifacts"


@pytest.mark.parametrize(
    ("key", "role"),
    [("head_start_ray_commands", "--head"), ("worker_start_ray_commands", "--address")],
)
def test_every_node_starts_ray_with_token_auth(key, role):
    starts = [words for words in commands(key) if words[1:3] == ["ray", "start"]]
    assert len(starts) == 1
    start = starts[0]
    assert start[0] == "RAY_AUTH_MODE=token"
    if role == "--head":
        assert "--head" in start and "--port=6379" in start
    else:
        assert "--address=$RAY_HEAD_IP:6379" in start


def test_cluster_configs_use_gpus_and_the_shared_storage():
    for name in ("cifar10", "svhn", "tinyimagenet"):
        job = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml")
        assert job.resources.use_gpu and job.data.dataset == name
        assert job.storage.path.startswith("/mnt/psat")
