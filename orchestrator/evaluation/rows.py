"""The rows of a report, torch- and Ray-free: what a row evaluates (`Row`), the aggregation's
rows, and the aggregation's results by row (`Evaluation`). `tasks` evaluates them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.evaluation.tasks import RowResult


@dataclass(frozen=True)
class Row:
    """One evaluated line of a table: a single model (``strategy`` None), or the ensemble of
    ``models`` under a strategy. ``models`` are model names (a member's norm, a plan's name)."""

    key: str
    label: str
    models: tuple[str, ...]
    strategy: str | None = None


def member_key(name: str) -> str:
    """The key of member ``name``'s own row in an aggregation: ``member.<name>``."""
    return f"member.{name}"


def aggregation_rows(members: Iterable[str], strategies: Iterable[str]) -> list[Row]:
    """Tables 3 and 4's rows: every member alone, then the ensemble of all under each of
    ``strategies``."""
    names = tuple(members)
    rows = [Row(member_key(name), f"H_{name}", (name,)) for name in names]
    return rows + [Row(strategy, f"PSAT {strategy}", names, strategy) for strategy in strategies]


@dataclass(frozen=True)
class Evaluation:
    """Tables 3 and 4's rows of one aggregation: ``rows`` and ``choice`` (per strategy) by key."""

    rows: dict[str, dict[str, float]]
    choice: dict[str, dict[str, dict[str, float]]]
    samples: int
    device: str

    @classmethod
    def of(cls, results: Mapping[str, RowResult]) -> Evaluation:
        first = next(iter(results.values()))
        return cls(
            rows={key: result.row for key, result in results.items()},
            choice={key: result.choice for key, result in results.items() if result.choice},
            samples=first.samples,
            device=first.device,
        )
