"""What to train: a `ModelPlan` per model (a PSAT member, eq. 9, or one of Table 1's baselines
on the plain ResNet). The baselines are `MULTI_NORM` (eq. 5-7 and MNG-AC) beside the single-norm
AT and NAT plans; a new baseline method is one name here plus its step in `psat_core.steps`.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import JobConfig
from psat_core.checkpoint import MemberSpec
from psat_core.steps import METHODS

OBJECTIVE = "objective"  # the metric holding `ModelPlan.objective`'s value


@dataclass(frozen=True)
class ModelPlan:
    """One model to train: its run name, training method (eq. 5-9), the norms it trains
    against, its embedding dimension (None: a plain network), its architecture (None:
    `model.arch`; Table 5's lightweight networks name theirs) and its training seed's offset
    from `training.seed` (the reproduction's `reproduce.seeds`)."""

    name: str
    method: str
    norms: tuple[str, ...]
    embedding_dim: int | None
    arch: str | None = None
    seed: int = 0

    def training_seed(self, job: JobConfig) -> int:
        """The seed of this model's initialization, batches and attacks."""
        return job.training.seed + self.seed

    @property
    def objective(self) -> str:
        """The validation metric a sweep maximizes: own-norm accuracy for AT, else trade-off."""
        return self.norms[0] if self.method == "at" else "trade_off"

    def spec(self, job: JobConfig) -> MemberSpec:
        """The checkpoint spec of this plan's model under `job`."""
        info = job.dataset
        return MemberSpec(
            arch=self.arch or job.model.arch,
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
            kernel_norm=job.model.kernel_norm,
        )


def psat_members(
    job: JobConfig, embedding_dim: int | None = None, prefix: str = ""
) -> list[ModelPlan]:
    """The PSAT members of ``job``: one hypernetwork per norm of ``training.members`` (eq. 9),
    named ``<prefix><norm>``."""
    dim = embedding_dim or job.model.embedding_dim
    return [ModelPlan(f"{prefix}{norm}", "at", (norm,), dim) for norm in job.training.members]


# Table 1's multi-norm baselines (eq. 5-7, MNG-AC): every method registered as one
MULTI_NORM = tuple(name for name, method in METHODS.items() if method.table1)


def figure_dims(job: JobConfig) -> list[int]:
    """Figure 2's embedding dimensions: ``reproduce.embedding_dims`` and ``model.embedding_dim``."""
    return sorted({*job.reproduce.embedding_dims, job.model.embedding_dim})
