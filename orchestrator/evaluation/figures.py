"""The plots of a report: accuracy bars per row, which member answers, and the trade-off
against the parameter share (the paper's Figure 2, for the reproduction and the sweep alike)."""

from __future__ import annotations

from collections.abc import Mapping

from matplotlib.figure import Figure

from orchestrator.evaluation.report import COLUMNS, HEADERS, STRATEGY_NAMES, attack_label
from orchestrator.evaluation.rows import member_key
from psat_core.ensemble import STRATEGIES


def accuracy_figure(rows: Mapping[str, Mapping[str, float]], names: list[str]) -> Figure:
    """Grouped bars: per column, each member alone and the ensemble under both strategies."""
    series = [(f"H_{n}", rows[member_key(n)]) for n in names]
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


def tradeoff_figure(
    curves: Mapping[str, list[tuple[int, float, float]]],
    plain: str,
    baselines: Mapping[str, float] | None = None,
) -> Figure:
    """The paper's Figure 2: trade-off accuracy against the parameter share of the plain
    ResNet (`plain` names it). ``curves``: label -> points ``(embedding dim, share, trade-off)``
    (fractions), one line each; ``baselines``: label -> trade-off, drawn as horizontal lines."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, points in curves.items():
        points = sorted(points, key=lambda point: point[1])
        xs, ys = [100 * p[1] for p in points], [100 * p[2] for p in points]
        ax.plot(xs, ys, "o-", label=label)
        for (dim, _, _), x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"z={dim}", (x, y), textcoords="offset points", xytext=(4, 4))
    for (label, value), style in zip((baselines or {}).items(), ("--", ":"), strict=False):
        ax.axhline(100 * value, linestyle=style, color="gray", label=label)
    ax.set_xlabel(f"parameters (% of the plain {plain})")
    ax.set_ylabel("trade-off accuracy (%)")
    ax.set_title("Trade-off vs parameter share (Figure 2)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig
