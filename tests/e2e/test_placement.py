"""GPU placement, proven on any machine: the session's Ray declares GPUs (no CUDA needed) and the
training job's real trainers ask for them (`resources.use_gpu`). Each member's worker records
the GPU Ray gave it on the member's MLflow run; without CUDA it trains on the CPU and says so.
"""

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from orchestrator.config import parse_config
from orchestrator.train_members import train_members

pytestmark = pytest.mark.slow
# enough work per epoch that members which hold their GPUs at once train at once
PACED = {
    "data": {"train_size": 256, "val_size": 16},
    "training": {"epochs": 2, "batch_size": 32},
    "attacks": {"train": {n: {"steps": 3} for n in ("linf", "l2", "l1")}},
}


@ray.remote(num_cpus=0, num_gpus=1)
class GpuHolder:
    """Holds one of the declared GPUs while it lives."""

    def gpu(self) -> str:
        return str(ray.get_gpu_ids()[0])


def placements(job) -> dict[str, dict]:
    """Per member: the GPU ids and device its worker recorded, and when it trained."""
    client = MlflowClient(job.tracking.uri)
    experiment = client.get_experiment_by_name(job.tracking.experiment).experiment_id
    query = f"tags.`psat.job` = '{job.name}' and tags.`psat.role` = 'model'"
    found = {}
    for run in client.search_runs([experiment], query):
        starts = client.get_metric_history(run.info.run_id, "epoch_start")
        ends = client.get_metric_history(run.info.run_id, "epoch_end")
        found[run.data.tags["psat.plan"]] = {
            "gpus": run.data.tags["psat.gpu_ids"].split(","),
            "device": run.data.tags["psat.device"],
            "start": min(m.value for m in starts),
            "end": max(m.value for m in ends),
        }
    return found


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def gpu_job(tiny_job, name: str, paced: bool = True, **resources):
    resources = {"use_gpu": True, "ddp_backend": "gloo", **resources}  # gloo: no CUDA here
    budget = PACED if paced else {"training": {"epochs": 1}}
    return parse_config(tiny_job(name, **budget, resources=resources))


@pytest.mark.usefixtures("tracking_store")
def test_members_train_on_gpus_of_their_own_and_the_third_waits_for_one(shared_ray, tiny_job):
    assert shared_ray.cluster_resources()["GPU"] == 3
    holder = GpuHolder.remote()
    held = ray.get(holder.gpu.remote())  # two GPUs left for three members
    lines: list[str] = []
    try:
        # unpaced: whatever each member's length, the third can start only when one ends
        train_members(gpu_job(tiny_job, "gpus", paced=False), echo=lines.append)
    finally:
        ray.kill(holder)
    members = placements(gpu_job(tiny_job, "gpus", paced=False))
    assert set(members) == {"linf", "l2", "l1"}
    for norm, member in members.items():
        assert len(member["gpus"]) == 1 and member["gpus"] != [held], (norm, member)
        if not torch.cuda.is_available():  # declared GPUs only: the CPU, never CUDA
            assert member["device"] == "cpu"
        assert any(line.startswith(f"[{norm}] started") and "Ray GPU" in line for line in lines)
    pairs = [(a, b) for a in members for b in members if a < b]
    for a, b in pairs:  # no two members that trained at once shared a GPU
        if overlap(members[a], members[b]):
            assert members[a]["gpus"] != members[b]["gpus"], members
    # two GPUs for three members: the last to start waited for another to end
    last = max(members.values(), key=lambda m: m["start"])
    assert last["start"] > min(m["end"] for m in members.values() if m is not last), members


@pytest.mark.usefixtures("tracking_store")
def test_fractional_gpus_put_three_members_on_one(shared_ray, tiny_job):
    holders = [GpuHolder.remote() for _ in range(2)]
    held = {ray.get(h.gpu.remote()) for h in holders}  # one GPU left
    try:
        train_members(gpu_job(tiny_job, "shared", gpus_per_worker=0.33), echo=lambda line: None)
    finally:
        for holder in holders:
            ray.kill(holder)
    members = placements(gpu_job(tiny_job, "shared"))
    (gpu,) = {tuple(m["gpus"]) for m in members.values()}  # the same one for all three
    assert gpu[0] not in held
    latest_start = max(m["start"] for m in members.values())
    assert latest_start < min(m["end"] for m in members.values()), members  # all at once


@pytest.mark.parametrize(
    ("value", "message"),
    [(1.5, "a fraction of a GPU must be at most 1"), (0, "greater than 0")],
)
def test_gpus_per_worker_is_a_fraction_or_whole(value, message):
    from orchestrator.config import ConfigError

    resources = {"use_gpu": True, "gpus_per_worker": value}
    with pytest.raises(ConfigError, match=f"resources.gpus_per_worker.*{message}"):
        parse_config({"name": "x", "resources": resources})
