"""The reproduction job: the paper's comparisons under one identical budget, checked harder.

    config -> `train_models` (Ray Train, MLflow; role "reproduce"): Table 1's baselines on the
       plain ResNet (NAT, AT_ℓ∞, AT_ℓ2, AT_ℓ1, AT_max, AT_avg, AT_msd, AT_mng), the PSAT members at
       `model.embedding_dim` and at every Figure 2 dimension, and Table 3's H_NAT
    -> `orchestrator.evaluation.evaluate_rows`: one Ray task per row, the suite
       `evaluation.suite` on every model (the gate and transfer attacks on every ensemble)
    -> Tables 1, 3 and 4 (Markdown + PNG), Figure 2 (PNG), the paper's claims checked against
       the numbers, results.json: into ``<reproduce.output>/<name>/`` and the MLflow run

Every model gets the same architecture, epochs and attacks (`training`, `attacks.train`); the
hypernetworks train with `training.optimizer`, the plain ResNets with `training.baselines`. Rows
are evaluated on the same images, seeded from `data.seed` and their models.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch
from matplotlib.figure import Figure

from orchestrator.config import JobConfig
from orchestrator.evaluation import RowResult, evaluate_rows
from orchestrator.fitting import ModelPlan, psat_members
from orchestrator.ray_session import check_ray
from orchestrator.report import (
    COLUMNS,
    HEADERS,
    accuracy_bars,
    attack_breakdown,
    attacks_described,
    markdown_table,
    percent,
)
from orchestrator.tracking import Tracker
from orchestrator.training import prepare_job, train_models
from psat_core.accounting import plain_parameters
from psat_core.metrics import paired_bootstrap

ROLE = "reproduce"
MULTI_NORM = ("max", "avg", "msd", "mng")  # Table 1's multi-norm methods (eq. 5-7, MNG-AC)


@dataclass(frozen=True)
class Row:
    """One evaluated line of the tables: a single model, or an ensemble under a strategy."""

    key: str
    label: str
    models: tuple[str, ...]  # plan names
    strategy: str | None = None  # None: a single model


def figure_dims(job: JobConfig) -> list[int]:
    """Figure 2's embedding dimensions: ``reproduce.embedding_dims`` and ``model.embedding_dim``."""
    return sorted({*job.reproduce.embedding_dims, job.model.embedding_dim})


def model_plans(job: JobConfig) -> list[ModelPlan]:
    """Every model the job trains, with one budget: Table 1's baselines, PSAT at each Figure 2
    dimension, and H_NAT (Table 3) at ``model.embedding_dim``; the costliest (one attack per
    norm and step) first, so that the last models to start are quick ones."""
    norms = tuple(job.training.members)
    plans = [ModelPlan(f"at_{method}", method, norms, None) for method in MULTI_NORM]
    plans += [ModelPlan(f"at_{norm}", "at", (norm,), None) for norm in norms]
    plans.append(ModelPlan("nat", "nat", (), None))
    for dim in figure_dims(job):
        plans += psat_members(job, dim, prefix=f"h{dim}_")
    if job.reproduce.nat_member:
        dim = job.model.embedding_dim
        plans.append(ModelPlan(f"h{dim}_nat", "nat", (), dim))
    return plans


def table_rows(job: JobConfig) -> dict[str, list[Row]]:
    """The rows of Tables 1, 3 and 4 and Figure 2, by table; a row shared by tables (PSAT) is
    the same object, evaluated once."""
    norms = list(job.training.members)
    dim = job.model.embedding_dim
    members = psat_names(job, dim)
    psat = Row(f"psat_z{dim}", "PSAT", members, "lowest_entropy")
    baselines = [Row("nat", "NAT", ("nat",))]
    baselines += [
        Row(f"at_{m}", f"AT_{HEADERS[m] if m in norms else m}", (f"at_{m}",))
        for m in [*norms, *MULTI_NORM]
    ]
    hyper = [Row(f"h{dim}_{n}", f"H_{HEADERS[n]}", (f"h{dim}_{n}",)) for n in norms]
    table3 = hyper + [psat]
    if job.reproduce.nat_member:
        nat = f"h{dim}_nat"
        table3 = [Row(nat, "H_NAT", (nat,)), *table3]
        table3.append(Row(f"psat_z{dim}_nat", "+ H_NAT", (*members, nat), "lowest_entropy"))
    figure = [
        psat if z == dim else Row(f"psat_z{z}", f"PSAT z={z}", psat_names(job, z), psat.strategy)
        for z in figure_dims(job)
    ]
    return {
        "table1": [*baselines, psat],
        "table3": table3,
        "table4": [psat, Row(f"psat_z{dim}_average", "PSAT average", members, "average")],
        "figure2": figure,
    }


def psat_names(job: JobConfig, dim: int) -> tuple[str, ...]:
    """The run names of PSAT's members at embedding dimension ``dim``: ``h<dim>_<norm>``."""
    return tuple(plan.name for plan in psat_members(job, dim, prefix=f"h{dim}_"))


# --------------------------------------------------------------------------- the paper's claims


# the protocols every claim is judged under: RowResult.paper and RowResult.row
PROTOCOLS = {
    "paper": "the paper's protocol (per-norm PGD through the model)",
    "full": "psat's full evaluation (evaluation.suite)",
}


OUTCOMES = ("holds", "does not hold", "inconclusive")


def judged_protocols(job: JobConfig) -> tuple[str, ...]:
    """The protocols the claims are judged under: both, unless the suite is the paper's own
    (`evaluation.suite: paper`), where the full evaluation is the paper's protocol."""
    return ("paper",) if job.evaluation.suite == "paper" else tuple(PROTOCOLS)


@dataclass(frozen=True)
class Claim:
    """One qualitative claim of the paper, checked against this run's numbers under one of
    the :data:`PROTOCOLS`: ``difference`` (points; positive means the claim's side is ahead)
    and its 95% interval from a paired bootstrap over the evaluation images. It holds when the
    whole interval is above zero, does not hold when it is below, else it is inconclusive."""

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
    """Whether ``ours`` beats ``theirs`` (per-image scores on the same images): the outcome,
    the difference in points and its 95% paired-bootstrap interval."""
    difference, low, high = (100 * v for v in paired_bootstrap(ours, theirs))
    outcome = OUTCOMES[0] if low > 0 else OUTCOMES[1] if high < 0 else OUTCOMES[2]
    return outcome, difference, low, high


def paper_claims(
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    tables: dict[str, list[Row]],
    protocol: str = "full",
) -> list[Claim]:
    """The paper's comparisons, each judged here (scores: row key -> Table 1's columns image
    by image under `protocol`, every row on the same images)."""
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


# --------------------------------------------------------------------------- report


def _row_cells(row: Row, result: RowResult, protocol: str, extra: list[str]) -> list[str]:
    """The row's label and each column's accuracy with its standard error."""
    values, errors = result.under(protocol), result.errors(protocol)
    return [row.label, *(f"{percent(values[c])} ± {100 * errors[c]:.2f}" for c in COLUMNS), *extra]


def table_markdown(
    name: str,
    rows: list[Row],
    results: Mapping[str, RowResult],
    plain: int,
    protocol: str = "full",
) -> list[str]:
    """One table as Markdown under `protocol`, accuracies ± their standard errors (points);
    Table 1 adds parameters and the saving against the plain ResNet."""
    header = ["Method", *(HEADERS[c] for c in COLUMNS)]
    if name != "table1":
        return markdown_table(header, [_row_cells(r, results[r.key], protocol, []) for r in rows])
    cells = []
    for row in rows:
        parameters = results[row.key].parameters
        saving = "-" if row.strategy is None else f"↓ {percent(1 - parameters / plain)}"
        cells.append(_row_cells(row, results[row.key], protocol, [f"{parameters:,}", saving]))
    return markdown_table([*header, "# of Paras", "Paras Saving"], cells)


def figure2(
    dims: list[int],
    rows: list[Row],
    results: Mapping[str, RowResult],
    plain: int,
    baselines: Mapping[str, float],
) -> Figure:
    """Figure 2: PSAT's trade-off against its parameter share of the plain ResNet, one point
    per embedding dimension, with the best single- and multi-perturbation baselines."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    share = [100 * results[r.key].parameters / plain for r in rows]
    trade = [100 * results[r.key].row["trade_off"] for r in rows]
    ax.plot(share, trade, "o-", label="PSAT")
    for dim, x, y in zip(dims, share, trade, strict=True):
        ax.annotate(f"z={dim}", (x, y), textcoords="offset points", xytext=(4, 4))
    for (label, value), style in zip(baselines.items(), ("--", ":"), strict=True):
        ax.axhline(100 * value, linestyle=style, color="gray", label=label)
    ax.set_xlabel("parameters (% of the plain ResNet)")
    ax.set_ylabel("trade-off accuracy (%)")
    ax.set_title("Trade-off vs parameter share (Figure 2)")
    ax.legend(fontsize="small")
    return fig


PAPER_VIEW = "psat_core.protocol.paper_view: per-norm PGD, the gate's choice not differentiated"
TITLE1_PAPER = "Table 1 under the paper's protocol (per-norm PGD only)"
TITLES = {
    "table1": "Table 1: baselines and PSAT",
    "table3": "Table 3: single hypernetworks, PSAT, PSAT + H_NAT",
    "table4": "Table 4: lowest-entropy vs average inference",
}


def figure2_section(
    job: JobConfig, rows: list[Row], results: Mapping[str, RowResult], plain: int, out: Path
) -> list[str]:
    """Figure 2 (``figure2.png`` in ``out``) and its numbers as Markdown: PSAT at each
    embedding dimension against the best single- and multi-norm AT baselines."""
    trade_off = {key: result.row["trade_off"] for key, result in results.items()}
    best = {
        "best single-norm AT": max(trade_off[f"at_{n}"] for n in job.training.members),
        "best multi-norm AT": max(trade_off[f"at_{m}"] for m in MULTI_NORM),
    }
    dims = figure_dims(job)
    figure2(dims, rows, results, plain, best).savefig(out / "figure2.png", dpi=120)
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
    job: JobConfig, tables: dict[str, list[Row]], results: dict[str, RowResult], out: Path
) -> list[Claim]:
    """Tables 1, 3, 4 (Markdown + PNG), Figure 2 (PNG), report.md and results.json in ``out``;
    returns the paper's claims as checked here."""
    info = job.dataset
    plain = plain_parameters(job.model.arch, info.num_classes, info.in_channels)
    accuracies = {key: result.row for key, result in results.items()}
    protocols = judged_protocols(job)
    claims = [
        claim
        for protocol in protocols
        for claim in paper_claims(
            {key: result.examples(protocol) for key, result in results.items()}, tables, protocol
        )
    ]
    samples = next(iter(results.values())).samples
    t = job.training
    lines = [
        f"# Reproduction `{job.name}`: {job.data.dataset}, {job.model.arch}",
        "",
        f"Every model: {t.epochs} epochs, batch {t.batch_size}, {t.schedule} schedule, the "
        f"same training attacks; hypernetworks {t.optimizer.name} lr {t.lr} weight decay "
        f"{t.weight_decay}, plain ResNets {t.baselines.name} lr {t.baselines.lr} weight decay "
        f"{t.baselines.weight_decay}; "
        f"{samples} evaluation images. Attacks (robust points only, as in AutoAttack):",
        *attacks_described(job),
        "",
        "## The paper's claims, checked here under "
        + ("both protocols" if len(protocols) > 1 else "the paper's protocol"),
        "",
        f"The paper's protocol is the PGD attacks of the full evaluation alone ({PAPER_VIEW}).",
        "Each verdict is the difference in points with its 95% interval from a paired bootstrap "
        f"over the {samples} images: it holds (or not) only when the interval excludes zero. "
        "Accuracies below are ± their standard error.",
        "",
        *claims_table(claims),
    ]
    for name, title in TITLES.items():
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
        *attack_breakdown({row.label: accuracies[row.key] for row in _unique(tables)}, samples),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    payload = {
        "job": job.name,
        "plain_parameters": plain,
        "tables": {name: [asdict(row) for row in rows] for name, rows in tables.items()},
        "results": {key: asdict(result) for key, result in results.items()},
        "claims": [asdict(claim) for claim in claims],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    return claims


def _write_and_log(
    job: JobConfig,
    tables: dict[str, list[Row]],
    results: dict[str, RowResult],
    tracker: Tracker,
    run_id: str,
) -> tuple[Path, list[Claim]]:
    """The report into ``<reproduce.output>/<name>/`` (whole or not at all) and the run."""
    output = Path(job.reproduce.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{job.name}-", dir=output))
    try:
        claims = write_report(job, tables, results, staging)
        metrics = {
            f"{key}.{column}": value
            for key, result in results.items()
            for column, value in result.row.items()
        }
        metrics |= {f"{key}.parameters": result.parameters for key, result in results.items()}
        tracker.log_metrics(run_id, metrics, step=0)
        tracker.client.log_artifacts(run_id, str(staging), artifact_path=ROLE)
        final = output / job.name
        shutil.rmtree(final, ignore_errors=True)
        staging.chmod(0o755)  # mkdtemp's 0700 was for the staging only
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final, claims


def _unique(tables: dict[str, list[Row]]) -> list[Row]:
    seen: dict[str, Row] = {}
    for rows in tables.values():
        for row in rows:
            seen.setdefault(row.key, row)
    return list(seen.values())


# --------------------------------------------------------------------------- the job


def reproduce(job: JobConfig, echo: Callable[[str], None] = print) -> dict:
    """Train every model of the comparison, evaluate every row, write and log the report.

    Returns ``{"output": folder, "run_id": MLflow run, "claims": [...], "results": {...}}``.
    Relaunching with the same name resumes the training; evaluation and report are redone.
    """
    res = job.resources
    plans = model_plans(job)
    per_trainer = res.workers_per_member * (res.gpus or res.cpus_per_worker)
    concurrency = job.reproduce.concurrent_trainers
    check_ray(job, per_trainer)  # what can be refused before Ray starts is
    tracker = Tracker(job)
    tracker.resumable(ROLE)  # refused first
    manifest = prepare_job(job, per_trainer * (concurrency or 1))
    if concurrency is None:
        kind = "GPU" if res.use_gpu else "CPU"
        concurrency = max(1, int(ray.cluster_resources().get(kind, 0) // per_trainer))
    with tracker.job_run(ROLE) as run_id:  # FAILED (KILLED on Ctrl-C) if any step fails
        trained = train_models(job, plans, manifest, tracker, run_id, concurrency, echo)
        checkpoints = {name: result["checkpoint"] for name, result in trained.items()}
        tables = table_rows(job)
        rows = sorted(_unique(tables), key=lambda row: -len(row.models))  # ensembles cost most
        echo(f"evaluating {len(rows)} rows (Ray tasks): {', '.join(r.label for r in rows)}")
        specs = {row.key: ({m: checkpoints[m] for m in row.models}, row.strategy) for row in rows}
        results = evaluate_rows(job, specs, manifest["eval"], echo)
        final, claims = _write_and_log(job, tables, results, tracker, run_id)
    for claim in claims:
        echo(claim.line().removeprefix("- ").replace("**", ""))
    echo(f"report: {final / 'report.md'}; MLflow run {run_id}")
    return {"output": str(final), "run_id": run_id, "claims": claims, "results": results}
