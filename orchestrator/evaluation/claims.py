"""The paper's qualitative claims, judged on a run's numbers: each a difference in points
between two rows on the same images, with its 95% paired-bootstrap interval."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from orchestrator.config import JobConfig
from orchestrator.evaluation.report import HEADERS, markdown_table, percent
from orchestrator.evaluation.rows import Row
from orchestrator.training.plan import MULTI_NORM
from psat_core.metrics import paired_bootstrap

# the protocols every claim is judged under: RowResult.paper and RowResult.row
PROTOCOLS = {
    "paper": "the paper's protocol (per-norm PGD through the model)",
    "full": "psat's full evaluation (evaluation.suite)",
}


OUTCOMES = ("holds", "does not hold", "inconclusive")
# Table 6: PSAT 58.02% vs direct aggregation 59.74% on CIFAR-10, 1.72 points below
WITHIN_DIRECT = 2.0


def judged_protocols(job: JobConfig) -> tuple[str, ...]:
    """The protocols the claims are judged under: both, unless the suite is the paper's own
    (`evaluation.suite: paper`), where the full evaluation is the paper's protocol."""
    return ("paper",) if job.evaluation.suite == "paper" else tuple(PROTOCOLS)


@dataclass(frozen=True)
class Claim:
    """One qualitative claim of the paper, checked against this run's numbers under one of
    the :data:`PROTOCOLS`: ``difference`` (points; positive means the claim's side is ahead)
    and its 95% interval from a paired bootstrap over the training seeds and evaluation images.
    It holds when the whole interval is above zero, does not hold when it is below, else it is
    inconclusive."""

    table: str
    text: str
    outcome: str
    evidence: str
    difference: float
    low: float
    high: float
    protocol: str = "full"

    @property
    def verdict(self) -> str:
        outcome = self.outcome if self.outcome != "does not hold" else "**does NOT hold**"
        interval = f"{self.difference:+.2f} pts, 95% CI [{self.low:+.2f}, {self.high:+.2f}]"
        return f"{outcome} ({interval}; {self.evidence})"

    def line(self) -> str:
        return f"- {self.table}: {self.text}, under {PROTOCOLS[self.protocol]}: {self.verdict}"


def judge(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[str, float, float, float]:
    """Whether ``ours`` beats ``theirs`` (per-image scores on the same images, and seeds): the
    outcome, the difference in points and its 95% paired-bootstrap interval (seeds resampled,
    then images: `paired_bootstrap`)."""
    difference, low, high = (100 * v for v in paired_bootstrap(ours, theirs))
    outcome = OUTCOMES[0] if low > 0 else OUTCOMES[1] if high < 0 else OUTCOMES[2]
    return outcome, difference, low, high


def paper_claims(
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    tables: dict[str, list[Row]],
    protocol: str = "full",
) -> list[Claim]:
    """The paper's comparisons, each judged here (scores: row key -> Table 1's columns image
    by image under `protocol`, ``(images,)`` or ``(seeds, images)``, every row on the same
    images and seeds)."""
    psat = tables["table1"][-1]
    claims = []

    def mean(images: torch.Tensor) -> str:
        return percent(images.mean().item())

    def claim(table: str, text: str, ours: torch.Tensor, theirs: torch.Tensor, evidence: str):
        outcome, difference, low, high = judge(ours, theirs)
        claims.append(Claim(table, text, outcome, evidence, difference, low, high, protocol))

    def beats(table: str, text: str, other: Row, column: str) -> None:
        ours, theirs = scores[psat.key][column], scores[other.key][column]
        evidence = f"{HEADERS[column]} {mean(ours)} vs {other.label} {mean(theirs)}"
        claim(table, text, ours, theirs, evidence)

    members = [r for r in tables["table3"] if r.strategy is None and r.label != "H_NAT"]
    best = max(members, key=lambda r: scores[r.key]["trade_off"].mean().item())
    beats("Table 3", "PSAT's trade-off beats its best single-norm member", best, "trade_off")
    for row in tables["table1"]:
        if row.key in {f"at_{method}" for method in MULTI_NORM}:
            beats("Table 1", f"PSAT's trade-off beats {row.label}", row, "trade_off")
    plus_nat = next((r for r in tables["table3"] if r.label == "+ H_NAT"), None)
    if plus_nat is not None:
        before, after = scores[psat.key], scores[plus_nat.key]
        claim(
            "Table 3",
            "adding H_NAT collapses adversarial accuracy (avg at least halved)",
            before["avg"] / 2,
            after["avg"],
            f"max {mean(before['max'])} -> {mean(after['max'])}, "
            f"avg {mean(before['avg'])} -> {mean(after['avg'])}",
        )
    average = tables["table4"][1]
    beats("Table 4", "lowest-entropy beats average inference on max", average, "max")
    for row in tables.get("table5", [])[:-1]:  # the lightweight networks, PSAT last
        beats("Table 5", f"PSAT's trade-off beats {row.label}", row, "trade_off")
    direct = tables["table6"][1]
    ceiling = scores[direct.key]["trade_off"]
    for row in tables["table1"]:
        if row.key in {f"at_{method}" for method in MULTI_NORM}:
            theirs = scores[row.key]["trade_off"]
            claim("Table 6", f"direct aggregation's trade-off beats {row.label}", ceiling,
                  theirs, f"Trade-off {mean(ceiling)} vs {row.label} {mean(theirs)}")  # fmt: skip
    ours = scores[psat.key]["trade_off"]
    claim(
        "Table 6",
        f"PSAT's trade-off is within {WITHIN_DIRECT:g} points of direct aggregation's",
        ours + WITHIN_DIRECT / 100,  # holds when PSAT - direct > -N over the whole interval
        ceiling,
        f"Trade-off {mean(ours)} vs {direct.label} {mean(ceiling)} (3x the parameters)",
    )
    return claims


def claims_table(claims: list[Claim]) -> list[str]:
    """Each claim once, with its verdict under every protocol judged side by side (Markdown)."""
    verdicts: dict[tuple[str, str], dict[str, str]] = {}
    for claim in claims:
        verdicts.setdefault((claim.table, claim.text), {})[claim.protocol] = claim.verdict
    judged = [p for p in PROTOCOLS if any(c.protocol == p for c in claims)]
    header = ["Table", "Claim", *(PROTOCOLS[p].split(" (")[0] for p in judged)]
    cells = [[table, text, *(by[p] for p in judged)] for (table, text), by in verdicts.items()]
    return markdown_table(header, cells)
