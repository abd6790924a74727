"""Parameter accounting of a PSAT ensemble against the plain ResNet (Tables 1, 2 and 6)."""

from __future__ import annotations

from dataclasses import dataclass

from psat_core.checkpoint import MemberSpec
from psat_core.models import NoiseGenerator, count_parameters, create_model
from psat_core.settings import ARCHS


@dataclass(frozen=True)
class ParameterReport:
    arch: str
    num_classes: int
    embedding_dim: int
    members: int
    member: int  # one hypernetwork member: generator + embeddings + stem, BN and FC
    plain: int  # the plain ResNet of the same shape

    @property
    def aggregated(self) -> int:
        """The PSAT model F_H of eq. 10: every member's parameters."""
        return self.members * self.member

    @property
    def saving(self) -> float:
        return saving(self.aggregated, self.plain)

    def lines(self) -> list[str]:
        return [
            f"arch {self.arch}, {self.num_classes} classes, embedding dim {self.embedding_dim}",
            f"one member:       {self.member:>12,}",
            f"aggregated ({self.members}):   {self.aggregated:>12,}",
            f"plain {self.arch}: {self.plain:>12,}",
            f"saving:           {100 * self.saving:>11.2f}%",
        ]


def saving(parameters: int, plain: int) -> float:
    """Fraction of the plain ResNet's parameters saved (Table 1's "Paras Saving"; negative: the
    ensemble is larger)."""
    return 1.0 - parameters / plain


def plain_parameters(arch: str, num_classes: int, in_channels: int = 3) -> int:
    """Trainable parameters of the plain ResNet ``arch``: what Tables 1 and 2 save against."""
    return count_parameters(create_model(arch, num_classes=num_classes, in_channels=in_channels))


def trained_parameters(spec: MemberSpec) -> int:
    """Trainable parameters of the model `spec` describes as Table 1 counts them: the
    classifier's, plus the noise generator's for AT_mng (trained beside it, though evaluation
    uses the classifier alone)."""
    parameters = count_parameters(spec.build())
    if spec.method == "mng":
        parameters += count_parameters(NoiseGenerator(spec.in_channels))
    return parameters


def parameter_report(
    arch: str, num_classes: int, embedding_dim: int, members: int = 3, in_channels: int = 3
) -> ParameterReport:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    kw = {"num_classes": num_classes, "in_channels": in_channels}
    member = create_model(f"hyper_{arch}", embedding_dim=embedding_dim, **kw)
    return ParameterReport(
        arch=arch,
        num_classes=num_classes,
        embedding_dim=embedding_dim,
        members=members,
        member=count_parameters(member),
        plain=plain_parameters(arch, **kw),
    )
