"""The reproduction's report: Tables 1-6 (Markdown + PNG), Table 1 under the paper's protocol,
Figure 2, the claims judged, report.md and results.json, written into one folder.

Each row is evaluated once per training seed (`reproduce.seeds`, a `Seeded`): tables show the
mean over seeds, ± the standard error over images for one seed, ± the standard deviation over
seeds for several; claims resample seeds and, within them, images."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from orchestrator.config import JobConfig
from orchestrator.evaluation.claims import Claim, claims_table, judged_protocols, paper_claims
from orchestrator.evaluation.figures import accuracy_bars, tradeoff_figure
from orchestrator.evaluation.report import (
    COLUMNS,
    HEADERS,
    attack_breakdown,
    attacks_described,
    markdown_table,
    percent,
)
from orchestrator.evaluation.rows import Row
from orchestrator.evaluation.tasks import RowResult
from orchestrator.runtime.terminal import duration
from orchestrator.training.plan import MULTI_NORM, figure_dims
from psat_core.accounting import plain_parameters, saving


@dataclass(frozen=True)
class Seeded:
    """One row's results, one per training seed (the first seed first)."""

    seeds: list[RowResult]

    @property
    def parameters(self) -> int:
        return self.seeds[0].parameters

    def under(self, protocol: str) -> dict[str, float]:
        """Every value of the row under `protocol` (`RowResult.under`), the mean over seeds."""
        values = [result.under(protocol) for result in self.seeds]
        return {key: statistics.fmean(v[key] for v in values) for key in values[0]}

    def spread(self, protocol: str) -> dict[str, float]:
        """Each column's ± : its standard error over images for one seed, else the standard
        deviation of its seeds' values."""
        if len(self.seeds) == 1:
            return self.seeds[0].errors(protocol)
        values = [result.under(protocol) for result in self.seeds]
        return {c: statistics.stdev(v[c] for v in values) for c in COLUMNS}

    def examples(self, protocol: str) -> dict[str, torch.Tensor]:
        """Table 1's columns, ``(seeds, images)``: what a claim's bootstrap resamples."""
        per_seed = [result.examples(protocol) for result in self.seeds]
        return {c: torch.stack([s[c] for s in per_seed]) for c in per_seed[0]}


def _row_cells(row: Row, result: Seeded, protocol: str, extra: list[str]) -> list[str]:
    """The row's label and each column's accuracy with its spread (`Seeded.spread`)."""
    values, errors = result.under(protocol), result.spread(protocol)
    return [row.label, *(f"{percent(values[c])} ± {100 * errors[c]:.2f}" for c in COLUMNS), *extra]


def table_markdown(
    name: str,
    rows: list[Row],
    results: Mapping[str, Seeded],
    plain: int,
    protocol: str = "full",
) -> list[str]:
    """One table as Markdown under `protocol`, accuracies ± their spread (points); Tables 1
    and 2 add parameters and the saving against the plain ResNet, Tables 5 and 6 parameters
    and their multiple of the plain ResNet's."""
    header = ["Method", *(HEADERS[c] for c in COLUMNS)]
    if name in ("table5", "table6"):
        cells = [
            _row_cells(row, results[row.key], protocol, [f"{p:,}", f"{p / plain:.2f}x"])
            for row in rows
            for p in [results[row.key].parameters]
        ]
        return markdown_table([*header, "# of Paras", "x plain"], cells)
    if name not in ("table1", "table2"):
        return markdown_table(header, [_row_cells(r, results[r.key], protocol, []) for r in rows])
    cells = []
    for row in rows:
        parameters = results[row.key].parameters
        saved = "-" if row.strategy is None else f"↓ {percent(saving(parameters, plain))}"
        cells.append(_row_cells(row, results[row.key], protocol, [f"{parameters:,}", saved]))
    return markdown_table([*header, "# of Paras", "Paras Saving"], cells)


PAPER_VIEW = (
    "psat_core.attacks.suites.paper_view: per-norm PGD, the gate's choice not differentiated"
)


TITLE1_PAPER = "Table 1 under the paper's protocol (per-norm PGD only)"


TITLES = {
    "table1": "Table 1: baselines and PSAT",
    "table2": "Table 2: PSAT at each embedding dimension",
    "table3": "Table 3: single hypernetworks, PSAT, PSAT + H_NAT",
    "table4": "Table 4: lowest-entropy vs average inference",
    "table5": "Table 5: PSAT vs lightweight networks trained with SAT",
    "table6": "Table 6: PSAT vs the direct aggregation of the AT specialists",
}


def figure2_section(
    job: JobConfig, rows: list[Row], results: Mapping[str, Seeded], plain: int, out: Path
) -> list[str]:
    """Figure 2 (``figure2.png`` in ``out``) and its numbers as Markdown: PSAT at each
    embedding dimension against the best single- and multi-norm AT baselines."""
    trade_off = {key: result.under("full")["trade_off"] for key, result in results.items()}
    best = {
        "best single-norm AT": max(trade_off[f"at_{n}"] for n in job.training.members),
        "best multi-norm AT": max(trade_off[f"at_{m}"] for m in MULTI_NORM),
    }
    dims = figure_dims(job)
    points = [
        (dim, results[row.key].parameters / plain, trade_off[row.key])
        for dim, row in zip(dims, rows, strict=True)
    ]
    figure = tradeoff_figure({"PSAT": points}, job.model.arch, best)
    figure.savefig(out / "figure2.png", dpi=120)
    cells = [
        [
            f"PSAT z={dim}" + (" (Table 1)" if dim == job.model.embedding_dim else ""),
            f"{results[row.key].parameters:,}",
            percent(results[row.key].parameters / plain),
            percent(trade_off[row.key]),
        ]
        for dim, row in zip(dims, rows, strict=True)
    ]
    cells += [[label, "-", "-", percent(value)] for label, value in best.items()]
    return [
        "## Figure 2: trade-off vs parameter share",
        "",
        *markdown_table(["Model", "Parameters", f"share of {plain:,}", "Trade-off"], cells),
        "",
        "![Figure 2](figure2.png)",
    ]


def write_report(
    job: JobConfig,
    tables: dict[str, list[Row]],
    results: dict[str, Seeded],
    out: Path,
    wall: dict[str, float],
) -> list[Claim]:
    """Tables 1-6 (Markdown + PNG), Figure 2 (PNG), report.md and results.json in ``out``;
    returns the paper's claims as checked here. ``wall``: seconds per phase of the job."""
    info = job.dataset
    plain = plain_parameters(job.model.arch, info.num_classes, info.in_channels)
    accuracies = {key: result.under("full") for key, result in results.items()}
    protocols = judged_protocols(job)
    claims = [
        claim
        for protocol in protocols
        for claim in paper_claims(
            {key: result.examples(protocol) for key, result in results.items()}, tables, protocol
        )
    ]
    samples, seeds = next(iter(results.values())).seeds[0].samples, job.reproduce.seeds
    t = job.training
    lines = [
        f"# Reproduction `{job.name}`: {job.data.dataset}, {job.model.arch}",
        "",
        f"Every model: {t.epochs} epochs, batch {t.batch_size}, {t.schedule} schedule, the "
        f"same training attacks; hypernetworks {t.optimizer.name} lr {t.lr} weight decay "
        f"{t.weight_decay}, plain ResNets {t.baselines.name} lr {t.baselines.lr} weight decay "
        f"{t.baselines.weight_decay}; "
        f"{samples} evaluation images; {seeds} training seed{'s' * (seeds > 1)} of every model. "
        "Attacks (robust points only, as in AutoAttack):",
        *attacks_described(job),
        "",
        "Wall time: " + ", ".join(f"{phase} {duration(s)}" for phase, s in wall.items()) + ".",
        "",
        "## The paper's claims, checked here under "
        + ("both protocols" if len(protocols) > 1 else "the paper's protocol"),
        "",
        f"The paper's protocol is the PGD attacks of the full evaluation alone ({PAPER_VIEW}).",
        *_uncertainty(samples, seeds),
        "",
        *claims_table(claims),
    ]
    for name, title in ((n, t) for n, t in TITLES.items() if n in tables):
        table = table_markdown(name, tables[name], results, plain)
        (out / f"{name}.md").write_text("\n".join([f"# {title}", "", *table]) + "\n")
        series = [(row.label, accuracies[row.key]) for row in tables[name]]
        accuracy_bars(series, title).savefig(out / f"{name}.png", dpi=120)
        lines += ["", f"## {title}", "", *table, "", f"![{title}]({name}.png)"]
    table = table_markdown("table1", tables["table1"], results, plain, "paper")
    (out / "table1_paper.md").write_text("\n".join([f"# {TITLE1_PAPER}", "", *table]) + "\n")
    lines += ["", f"## {TITLE1_PAPER}", "", *table]

    lines += ["", *figure2_section(job, tables["figure2"], results, plain, out), ""]
    lines += [
        "## Every attack",
        "",
        *attack_breakdown({row.label: accuracies[row.key] for row in unique_rows(tables)}, samples),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    payload = {
        "job": job.name,
        "plain_parameters": plain,
        "seeds": seeds,
        "wall_seconds": wall,
        "tables": {name: [asdict(row) for row in rows] for name, rows in tables.items()},
        # each seed's row under its own key (`reproduce.seeded`): psat_z64, psat_z64_s1, ...
        "results": {
            key + seed_suffix(seed): asdict(result)
            for key, rows in results.items()
            for seed, result in enumerate(rows.seeds)
        },
        "claims": [asdict(claim) for claim in claims],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    return claims


def _uncertainty(samples: int, seeds: int) -> list[str]:
    """What the report's intervals and ± cover."""
    if seeds == 1:
        return [
            "Each verdict is the difference in points with its 95% interval from a paired "
            f"bootstrap over the {samples} images (one training seed: image noise only): it "
            "holds (or not) only when the interval excludes zero. Accuracies below are ± their "
            "standard error over images."
        ]
    return [
        "Each verdict is the difference in points, averaged over the seeds, with its 95% "
        f"interval from a two-stage bootstrap: {seeds} seeds drawn with replacement, then, within "
        f"each, the {samples} images, paired across the two rows. It covers training noise (a "
        "model trained again) and evaluation noise (other test images); the verdict holds (or "
        "not) only when the interval excludes zero. Accuracies below are the mean over seeds ± "
        "their standard deviation over seeds."
    ]


def seed_suffix(seed: int) -> str:
    """What a model's or a row's name carries for its seed: nothing for the first, ``_s<k>``."""
    return f"_s{seed}" if seed else ""


def unique_rows(tables: dict[str, list[Row]]) -> list[Row]:
    seen: dict[str, Row] = {}
    for rows in tables.values():
        for row in rows:
            seen.setdefault(row.key, row)
    return list(seen.values())
