"""The plots of a report: accuracy bars per row, which member answers, and the trade-off
against the parameter share (the paper's Figure 2, for the reproduction and the sweep alike)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from matplotlib.figure import Figure

from orchestrator.evaluation.report import COLUMNS, HEADERS, STRATEGY_NAMES, attack_label
from orchestrator.evaluation.tasks import Row, RowResult
from psat_core.ensemble import STRATEGIES


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


def accuracy_figure(rows: Mapping[str, Mapping[str, float]], names: list[str]) -> Figure:
    """Grouped bars: per column, each member alone and the ensemble under both strategies."""
    series = [(f"H_{n}", rows[f"member.{n}"]) for n in names]
    series += [(f"PSAT {STRATEGY_NAMES[s].lower()}", rows[s]) for s in STRATEGIES]
    return accuracy_bars(series, "Accuracy per attack: members vs the PSAT ensemble")


def accuracy_bars(series: list[tuple[str, Mapping[str, float]]], title: str) -> Figure:
    """One group of bars per Table 1 column, one bar per (label, row) of ``series``."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (label, row) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(COLUMNS))]
        ax.bar(xs, [100 * row[c] for c in COLUMNS], width, label=label)
    ax.set_xticks(range(len(COLUMNS)), [HEADERS[c] for c in COLUMNS])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(ncols=min(len(series), 5), loc="upper center", fontsize="small")
    return fig


def choice_figure(
    choice: Mapping[str, Mapping[str, Mapping[str, float]]], names: list[str]
) -> Figure:
    """Per strategy, stacked bars: how often each member answers, clean and under each attack."""
    fig = Figure(figsize=(5 * len(choice), 4), layout="constrained")
    axes = fig.subplots(1, len(choice), squeeze=False)[0]
    for ax, (strategy, per_input) in zip(axes, choice.items(), strict=True):
        inputs = list(per_input)
        bottom = [0.0] * len(inputs)
        for name in names:
            heights = [100 * per_input[k][name] for k in inputs]
            ax.bar(range(len(inputs)), heights, bottom=bottom, label=f"H_{name}")
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_xticks(range(len(inputs)), [attack_label(k) for k in inputs], rotation=90)
        ax.set_ylim(0, 100)
        ax.set_ylabel("images answered (%)")
        ax.set_title(f"Which member answers ({STRATEGY_NAMES[strategy].lower()})")
        ax.legend(fontsize="small")
    return fig


def tradeoff_figure(rows: list[dict], arch: str):
    """Figure 2: trade-off accuracy against the PSAT model's share of the plain ResNet's params."""
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for norm, group in itertools.groupby(
        sorted(rows, key=lambda r: r["norm"]), lambda r: r["norm"]
    ):
        group = sorted(group, key=lambda r: r["param_share"])
        xs = [100 * r["param_share"] for r in group]
        ys = [100 * r["metrics"].get("trade_off", float("nan")) for r in group]
        axis.plot(xs, ys, "o-", label=f"member {norm}")
        for r, x, y in zip(group, xs, ys, strict=True):
            axis.annotate(
                f"z={r['embedding_dim']}", (x, y), textcoords="offset points", xytext=(3, 3)
            )
    axis.set_xlabel(f"PSAT parameters (% of plain {arch})")
    axis.set_ylabel("trade-off accuracy (%)")
    axis.set_title("Trade-off accuracy vs parameter share (paper Fig. 2)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure
