import shlex
from pathlib import Path

import yaml

from orchestrator.config import load_config

ROOT = Path(__file__).parents[1]


def test_cluster_yaml_has_cpu_head_and_scaling_gpu_workers():
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "head_node_type",
                "available_node_types", "file_mounts", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):  # fmt: skip
        assert key in cluster, key
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    gpu_types = [t for name, t in types.items() if t["resources"].get("GPU") == 1]
    assert gpu_types, "a worker node type with one GPU per node"
    assert max(t["max_workers"] for t in gpu_types) >= 3
    assert cluster["max_workers"] >= 3
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and "~/psat" in setup
    assert cluster["file_mounts"]["~/psat"] == "."
    assert "mount" in setup and "/mnt/psat" in setup  # shared checkpoint storage
    assert any("--head" in c for c in cluster["head_start_ray_commands"])


def test_cluster_yaml_starts_every_node_with_token_auth_and_installs_psat():
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [shlex.split(c) for c in cluster[key] if "ray start" in c]
        assert len(starts) == 1 and starts[0][:3] == ["RAY_AUTH_MODE=token", "ray", "start"]
    installs = [shlex.split(c) for c in cluster["setup_commands"] if "install" in c]
    psat = [words for words in installs if "~/psat" in words]
    assert psat and "-e" not in psat[0]  # a real install: psat's pinned dependencies


def test_cluster_configs_use_gpus_and_the_shared_storage():
    for name in ("cifar10", "svhn", "tinyimagenet"):
        job = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml")
        assert job.resources.use_gpu and job.data.dataset == name
        assert job.storage.path.startswith("/mnt/psat")
