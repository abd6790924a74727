"""Reports of evaluated rows as text: the column labels, Tables 1, 3 and 4 as Markdown and
terminal lines, the "every attack" table, the attacks described, the aggregation's report.md.
Plots are `figures`; the reproduction's report is `reproduction`.

Rows are `tasks.RowResult.row`s: Table 1's columns plus one key per attack
(``"<norm>/<attack>"``), the accuracy after that attack and the attacks of its norm before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from orchestrator.config import JobConfig
from orchestrator.evaluation.rows import Evaluation, member_key
from psat_core.attacks.suites import describe_suite
from psat_core.ensemble import STRATEGIES
from psat_core.metrics import TABLE1_KEYS, norm_of
from psat_core.settings import NORM_SYMBOLS

COLUMNS = (*TABLE1_KEYS, "trade_off")
HEADERS = {
    "clean": "Clean",
    **NORM_SYMBOLS,
    "max": "Max",
    "avg": "Avg",
    "trade_off": "Trade-off",
}
STRATEGY_NAMES = {"lowest_entropy": "Lowest entropy", "average": "Average"}


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _accuracy_row(label: str, row: Mapping[str, float]) -> list[str]:
    return [label, *(percent(row[c]) for c in COLUMNS)]


def attack_label(key: str) -> str:
    """``"clean"`` -> ``"Clean"``, ``"linf/torchattacks.APGD"`` -> ``"ℓ∞ torchattacks.APGD"``."""
    norm, _, variant = key.partition("/")
    return f"{HEADERS.get(norm, norm)} {variant}".strip()


def attack_breakdown(rows: Mapping[str, Mapping[str, float]], samples: int) -> list[str]:
    """A Markdown table: for each model, what every attack it faced found, by norm. A cell is
    the accuracy after that attack (and those of its norm before it) and how many of the
    ``samples`` points it was the first to break; ``-``: not run on that model (e.g. the
    adaptive attacks on a single model)."""
    names = list(dict.fromkeys(k for row in rows.values() for k in row if "/" in k))
    names.sort(key=lambda n: norm_of(n))  # stable: each norm's attacks in evaluation order
    cells = []
    for label, row in rows.items():
        before: dict[str, float] = {}
        line = [label]
        for name in names:
            if name not in row:
                line.append("-")
                continue
            previous = before.get(norm_of(name), row["clean"])
            found = round((previous - row[name]) * samples)
            before[norm_of(name)] = row[name]
            line.append(f"{percent(row[name])} ({found} found)")
        cells.append(line)
    return markdown_table(["Model", *(attack_label(n) for n in names)], cells)


def attacks_described(job: JobConfig) -> list[str]:
    """One Markdown bullet per attack family of a final evaluation: each family of the suite
    describes itself (`psat_core.attacks.suites.describe_suite`)."""
    evaluation = job.evaluation
    return describe_suite(
        evaluation.suite,
        job.attack_configs("eval"),
        evaluation.apgd_steps,
        evaluation.gate_temperature,
        evaluation.square_queries,
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_report(
    job: JobConfig,
    members: Mapping[str, str],
    evaluation: Evaluation,
    parameters: Mapping[str, float],
    registry_lines: Sequence[str] = (),
) -> str:
    """The human-readable summary: Tables 3 and 4, every attack, member choice, parameters,
    registry; one section each."""
    names = list(members)
    sections = [
        _summary(job, members, evaluation),
        _tables_3_and_4(evaluation.rows, names, job.registry.strategy),
        _every_attack(evaluation, names),
        _member_choice(evaluation.choice, names),
        _parameters(parameters, names, job.model.arch),
    ]
    if registry_lines:
        sections.append(["## Registry", "", *(f"- {line}" for line in registry_lines)])
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def _summary(job: JobConfig, members: Mapping[str, str], evaluation: Evaluation) -> list[str]:
    return [
        f"# PSAT aggregation of job `{job.name}`",
        "",
        f"{evaluation.samples} evaluation images of {job.data.dataset} "
        f"(device {evaluation.device}). Attacks, in this order, each on the points still "
        "robust for its norm (as in AutoAttack):",
        *attacks_described(job),
        "",
        "Members:",
        *(f"- `{n}`: {location}" for n, location in members.items()),
    ]


def _tables_3_and_4(rows: Mapping[str, dict], names: list[str], strategy: str) -> list[str]:
    header = [HEADERS[c] for c in COLUMNS]
    members = [_accuracy_row(f"H_{n}", rows[member_key(n)]) for n in names]
    ensemble = _accuracy_row(f"PSAT ({STRATEGY_NAMES[strategy]})", rows[strategy])
    strategies = [_accuracy_row(STRATEGY_NAMES[s], rows[s]) for s in STRATEGIES]
    return [
        "## Members and the PSAT ensemble (Table 3)",
        "",
        *markdown_table(["Model", *header], [*members, ensemble]),
        "",
        "## Inference strategy (Table 4)",
        "",
        *markdown_table(["Strategy", *header], strategies),
    ]


def _every_attack(evaluation: Evaluation, names: list[str]) -> list[str]:
    rows = evaluation.rows
    models = {f"H_{n}": rows[member_key(n)] for n in names}
    models |= {f"PSAT ({STRATEGY_NAMES[s]})": rows[s] for s in STRATEGIES}
    return [
        "## Every attack",
        "",
        "Accuracy after each attack (and the attacks of its norm before it), and how many points "
        "that attack was the first to break.",
        "",
        *attack_breakdown(models, evaluation.samples),
    ]


def _member_choice(choice: Mapping[str, dict], names: list[str]) -> list[str]:
    lines = [
        "## Which member answers",
        "",
        "Fraction of the images each member answered (under an attack: on its adversarial "
        "examples for the points it attacked, the clean image otherwise).",
    ]
    for s in STRATEGIES:
        fractions = [
            [attack_label(k), *(percent(by_member[n]) for n in names)]
            for k, by_member in choice[s].items()
        ]
        lines += ["", f"### {STRATEGY_NAMES[s]}", "", *markdown_table(["Input", *names], fractions)]
    return lines


def _parameters(parameters: Mapping[str, float], names: list[str], arch: str) -> list[str]:
    counts = [[f"H_{n}", f"{int(parameters[member_key(n)]):,}"] for n in names]
    counts += [
        [f"PSAT ({len(names)} members)", f"{int(parameters['aggregated']):,}"],
        [f"plain {arch}", f"{int(parameters['plain']):,}"],
        ["saving", percent(parameters["saving"])],
    ]
    return ["## Parameters", "", *markdown_table(["Model", "Parameters"], counts)]


def table_columns(rows: Mapping[str, Mapping[str, float]]) -> dict[str, list]:
    """Table 1 by column (a logged table): ``model`` (the labels), then one per column."""
    return {"model": list(rows), **{HEADERS[c]: [row[c] for row in rows.values()] for c in COLUMNS}}


def table_line(label: str, row: Mapping[str, float]) -> str:
    """``"PSAT lowest entropy: Clean 98.00%, ℓ∞ 48.00%, ..., Trade-off 50.78%"``."""
    return f"{label}: " + ", ".join(f"{HEADERS[c]} {percent(row[c])}" for c in COLUMNS)


def table_lines(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Table 1's columns for the terminal: a header, then one line per ``{label: row}``."""
    header = f"{'':<24}" + "".join(f"{HEADERS[c]:>11}" for c in COLUMNS)
    return [header] + [
        f"{label:<24}" + "".join(f"{percent(row[c]):>11}" for c in COLUMNS)
        for label, row in rows.items()
    ]
