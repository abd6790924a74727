"""Connecting a job to Ray: join the configured cluster, or start a Ray of its own here, and
write the job's data shards once (`prepare_job`, what every job does first). Capacity is
checked before Ray starts (`check_ray`).
"""

from __future__ import annotations

import logging
import math
import os

import ray
from ray._private.state import state as ray_state  # the cluster's ceiling, as Train reads it

from orchestrator.config import JobConfig
from orchestrator.config.locations import join
from orchestrator.runtime.capacity import (
    LOCAL_CPU_OVERSUBSCRIPTION,
    check_capacity,
    check_ray,
    model_needs,
)
from orchestrator.runtime.reach import check_address
from orchestrator.runtime.shards import materialize
from orchestrator.runtime.signals import sigterm_kept

log = logging.getLogger(__name__)


def connect_ray(job: JobConfig, cpus_wanted: float, cpus_required: float | None = None) -> None:
    """Join the configured cluster (or $RAY_ADDRESS, set inside Ray Jobs), else start one here.

    A local Ray gets `cpus_wanted` logical CPUs (so that the members run concurrently even
    where there are fewer cores), but at least the cores and at most
    LOCAL_CPU_OVERSUBSCRIPTION per core; each worker keeps its torch threads to
    `resources.torch_threads`. What one model needs at once (`cpus_required`, default
    workers_per_member × cpus_per_worker, and its GPUs) must fit in what the Ray can ever
    offer: else a ConfigError naming the fields, before any Ray work.
    """
    required = model_needs(job, cpus_required)
    address = join_cluster(job)
    if address:
        # an autoscaling cluster's ceiling (what Ray Train checks too), else what it has now
        capacity = ray_state.get_max_resources_from_cluster_config() or ray.cluster_resources()
        check_capacity(job, required, capacity, f"the Ray cluster at {address}")
        return
    if ray.is_initialized():  # a Ray this process started itself
        return
    check_ray(job, cpus_required)
    cores = os.cpu_count() or 1
    most = LOCAL_CPU_OVERSUBSCRIPTION * cores
    # progress comes through the ProgressBoard; worker logs stay in Ray's log files.
    # address="local": a new Ray of our own, even if another one runs on this machine.
    # The dashboard stays: Train's PlacementGroupCleaner asks its state API whether the
    # controller lives, and without it every trainer's shutdown waits out a 12 s timeout.
    # One machine is never preempted: no PreemptionWatcher process per trainer.
    with sigterm_kept():
        ray.init(
            address="local",
            num_cpus=min(most, max(cores, math.ceil(cpus_wanted))),
            log_to_driver=False,
            logging_level=logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING,
            runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}},
        )


def join_cluster(job: JobConfig) -> str | None:
    """Connect to `resources.address` (else $RAY_ADDRESS, set inside Ray Jobs) once; return it,
    or None where there is no cluster to join."""
    address = job.resources.ray_address()
    if address and not ray.is_initialized():
        check_address(address)
        verbose = log.isEnabledFor(logging.DEBUG)
        # worker and actor output (Ray Train's own chatter) stays in Ray's logs unless -v;
        # ray.init resets Ray's logger to logging_level
        with sigterm_kept():
            ray.init(
                address=address,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.WARNING,
            )
    return address


def prepare_job(job: JobConfig, cpus_wanted: float, cpus_required: float | None = None) -> dict:
    """What every job does first: join or start Ray (`connect_ray`) and write the data shards
    once (`shards.materialize`); returns the shards' manifest."""
    connect_ray(job, cpus_wanted, cpus_required)
    return materialize(job, data_uri(job), job.resources.workers_per_member)


def board_name(job: JobConfig) -> str:
    """The named actor holding a running job's progress events (models post, driver reads)."""
    return f"psat-progress-{job.name}"


def data_uri(job: JobConfig) -> str:
    return join(job.storage.resolved(), job.name, "data")
