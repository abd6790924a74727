"""Fitting one model, Ray-free: what each Ray Train worker runs, and what a bare loop runs.

A `ModelPlan` says what to train (a PSAT member, eq. 9, or a Table 1 baseline); a `Fit` holds
one model's training state on one worker (model, optimizer, schedule, training method) and
does one epoch, one validation, one checkpoint state at a time. `trainers.train_loop` runs it
under Ray Train; `train_in_process` runs it here (the overhead benchmark's bare loop).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import JobConfig
from psat_core.checkpoint import MemberSpec

OBJECTIVE = "objective"  # the metric holding `ModelPlan.objective`'s value


@dataclass(frozen=True)
class ModelPlan:
    """One model to train: its run name, training method (eq. 5-9), the norms it trains
    against, and its embedding dimension (None: a plain ResNet)."""

    name: str
    method: str
    norms: tuple[str, ...]
    embedding_dim: int | None

    @property
    def objective(self) -> str:
        """The validation metric a sweep maximizes: own-norm accuracy for AT, else trade-off."""
        return self.norms[0] if self.method == "at" else "trade_off"

    def spec(self, job: JobConfig) -> MemberSpec:
        """The checkpoint spec of this plan's model under `job`."""
        info = job.dataset
        return MemberSpec(
            arch=job.model.arch,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            mean=tuple(info.mean),
            std=tuple(info.std),
            dataset=info.name,
            norms=self.norms,
            method=self.method,
            embedding_dim=self.embedding_dim,
            reduction=job.model.reduction,
            init=job.model.init,
        )


def psat_members(
    job: JobConfig, embedding_dim: int | None = None, prefix: str = ""
) -> list[ModelPlan]:
    """The PSAT members of ``job``: one hypernetwork per norm of ``training.members`` (eq. 9),
    named ``<prefix><norm>``."""
    dim = embedding_dim or job.model.embedding_dim
    return [ModelPlan(f"{prefix}{norm}", "at", (norm,), dim) for norm in job.training.members]


MULTI_NORM = ("max", "avg", "msd", "mng")  # Table 1's multi-norm methods (eq. 5-7, MNG-AC)


def figure_dims(job: JobConfig) -> list[int]:
    """Figure 2's embedding dimensions: ``reproduce.embedding_dims`` and ``model.embedding_dim``."""
    return sorted({*job.reproduce.embedding_dims, job.model.embedding_dim})
