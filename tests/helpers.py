"""Small builders shared by the tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from psat_core.checkpoint import MemberSpec, save_member
from psat_core.settings import dataset_info


def synthetic(
    n: int, seed: int, classes: int = 4, noise: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of fixed class prototypes in [0, 1] (1x8x8): separable, yet attackable."""
    protos = torch.rand(classes, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = (protos[y] + noise * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


def _ray_state(ray, lister: str, **options) -> list:
    """`ray.util.state.<lister>` on the Ray of `ray`: every record, live or dead."""
    from ray.util import state

    gcs = ray.get_runtime_context().gcs_address
    return getattr(state, lister)(address=gcs, limit=10_000, raise_on_missing_output=False,
                                  **options)  # fmt: skip


def ray_actors(ray) -> dict:
    """Every actor the Ray of `ray` has had, live or dead, by id (Ray's state API)."""
    return {a.actor_id: a for a in _ray_state(ray, "list_actors")}


def ray_tasks(ray, name: str) -> dict:
    """Every run of the Ray task `name` the Ray of `ray` has recorded, by task id, with its
    times (`creation_time_ms`, `start_time_ms`, `end_time_ms`)."""
    tasks = _ray_state(ray, "list_tasks", filters=[("name", "=", name)], detail=True)
    return {t.task_id: t for t in tasks}


def write_member(
    directory: Path, norm: str, seed: int, arch: str = "resnet10", embedding_dim: int = 4
) -> Path:
    """A digits member checkpoint; `embedding_dim` other than 4 makes tensors its spec rejects."""
    info = dataset_info("digits")
    spec = MemberSpec(arch, 10, 1, info.mean, info.std, "digits", (norm,), embedding_dim=4)
    torch.manual_seed(seed)
    model = dataclasses.replace(spec, embedding_dim=embedding_dim).build()
    save_member(directory, spec, {"model": model.state_dict(), "epoch": 0})
    return directory


def evaluate_in_process(job_dict: dict, members: dict[str, str], eval_uri: str):
    """The aggregation's rows evaluated in this process, without Ray (each row as its Ray task
    would): every member alone, lending its examples, then the ensemble per strategy."""
    from orchestrator.config import JobConfig
    from orchestrator.evaluation.rows import Evaluation, aggregation_rows
    from orchestrator.evaluation.tasks import evaluate_row, lenders
    from psat_core.ensemble import STRATEGIES

    rows = aggregation_rows(members, STRATEGIES)
    borrowers, lending = lenders(JobConfig.model_validate(job_dict), rows)
    results, lent = {}, {}
    for row in rows:  # members first
        borrowed = [lent[member] for member in borrowers.get(row.key, ())]
        models = {name: members[name] for name in row.models}
        results[row.key], lent[row.key] = evaluate_row(
            job_dict, models, row.strategy, eval_uri, None, "", row.key in lending, *borrowed
        )
    return Evaluation.of(results)
