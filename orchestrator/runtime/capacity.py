"""What one model needs at once against what the Ray it will run on can offer, checked before
Ray, torch or MLflow load (the CLI refuses in a fraction of a second) and again where a job
connects (`ray_session.connect_ray`, against a cluster's real capacity).
"""

from __future__ import annotations

import os
import sys

from orchestrator.config import ConfigError, JobConfig
from orchestrator.runtime.reach import check_address

LOCAL_CPU_OVERSUBSCRIPTION = 2  # a local Ray gets at most this many logical CPUs per core


def one_model(job: JobConfig, command: str) -> float:
    """The CPUs one unit of job `command` holds at once (GPUs for a reproduction's trainer
    with `resources.use_gpu`): a member's workers (train, run), a trial's driver and workers
    (sweep), one trainer (reproduce), one evaluation row (aggregate, evaluate)."""
    res = job.resources
    return {
        "train": res.cpus_per_model,
        "run": res.cpus_per_model,
        "sweep": 1 + res.cpus_per_model,
        "reproduce": res.gpus_per_model or res.cpus_per_model,
        "aggregate": res.cpus_per_worker,
        "evaluate": res.cpus_per_worker,
    }[command]


def model_needs(job: JobConfig, cpus_required: float | None) -> dict[str, float]:
    res = job.resources
    return {
        "CPU": cpus_required or res.cpus_per_model,
        "GPU": res.gpus_per_model,
    }


def check_ray(job: JobConfig, cpus_required: float | None = None) -> None:
    """What can be checked about Ray before anything is written or started, else a
    ConfigError: the cluster to join accepts connections (`check_address`); where the job
    starts a Ray of its own, what one model needs at once fits this machine."""
    address = job.resources.ray_address()
    if address:
        check_address(address)
    ray = sys.modules.get("ray")  # not imported: no Ray of this process's own either
    if address or (ray is not None and ray.is_initialized()):
        return
    cores = os.cpu_count() or 1
    required = model_needs(job, cpus_required)
    capacity = {"CPU": LOCAL_CPU_OVERSUBSCRIPTION * cores, "GPU": _local_gpus(required["GPU"])}
    where = f"a local Ray on this machine's {cores} cores"
    check_capacity(job, required, capacity, where)


def _local_gpus(wanted: float) -> int:
    """The GPUs CUDA sees here; torch is loaded only when a model wants one."""
    if not wanted:
        return 0
    import torch

    return torch.cuda.device_count()


def check_capacity(job: JobConfig, required: dict, capacity: dict, where: str) -> None:
    res = job.resources
    if required["CPU"] > capacity.get("CPU", 0):
        raise ConfigError(
            f"one model needs {required['CPU']:g} CPUs at once (resources.workers_per_member="
            f"{res.workers_per_member} x resources.cpus_per_worker={res.cpus_per_worker:g}); "
            f"{where} offers at most {capacity.get('CPU', 0):g}: lower them, or run on a "
            "larger cluster (resources.address, psat submit)"
        )
    if required["GPU"] > capacity.get("GPU", 0):
        raise ConfigError(
            f"resources.use_gpu asks for {required['GPU']:g} GPU(s) per model "
            f"(resources.workers_per_member x resources.gpus_per_worker); {where} offers "
            f"{capacity.get('GPU', 0):g}: set "
            "resources.use_gpu=false, fewer workers, or run on a cluster with GPUs"
        )
