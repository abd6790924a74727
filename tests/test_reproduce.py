"""The reproduction job: which models and rows, the paper's claims (a tiny run end to end:
e2e/test_jobs.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import ROOT

from orchestrator.config import deep_merge, parse_config
from orchestrator.evaluation.claims import claims_table, judged_protocols, paper_claims
from orchestrator.reproduce import model_plans, seeded, table_rows
from psat_core.settings import LIGHTWEIGHT


def test_every_method_gets_the_same_budget_and_architecture():
    job = parse_config(
        {"name": "r", "model": {"embedding_dim": 16}, "reproduce": {"embedding_dims": [4, 16]}}
    )
    plans = {p.name: p for p in model_plans(job)}
    assert {p.method for p in plans.values() if p.embedding_dim is None} == {
        "nat",
        "at",
        "max",
        "avg",
        "msd",
        "mng",
        "sat",
    }
    # Table 5: every lightweight network, SAT against every norm, one seed: no suffix
    lightweight = {n: p for n, p in plans.items() if p.method == "sat"}
    assert {p.arch for p in lightweight.values()} == set(LIGHTWEIGHT)
    assert {p.norms for p in lightweight.values()} == {("linf", "l2", "l1")}
    assert all(p.seed == 0 and p.spec(job).arch == "resnet18" for p in plans.values()
               if p.method != "sat")  # fmt: skip
    assert (
        plans["at_max"].norms
        == plans["at_mng"].norms
        == plans["at_msd"].norms
        == ("linf", "l2", "l1")
    )
    assert plans["at_l2"].norms == ("l2",) and plans["at_l2"].embedding_dim is None
    # PSAT at every Figure 2 dimension, H_NAT at the Table 1 dimension only
    assert {n for n, p in plans.items() if p.embedding_dim} == {
        *(f"h{z}_{n}" for z in (4, 16) for n in ("linf", "l2", "l1")),
        "h16_nat",
    }
    tables = table_rows(job)
    psat = tables["table1"][-1]
    assert psat.models == ("h16_linf", "h16_l2", "h16_l1") and psat.strategy == "lowest_entropy"
    assert tables["table3"][-1].models == (*psat.models, "h16_nat")
    assert tables["table4"][0] is psat and tables["table4"][1].strategy == "average"
    assert [r.key for r in tables["figure2"]] == ["psat_z4", "psat_z16"]
    assert [(r.key, r.label) for r in tables["table2"]] == [("psat_z4", "PSAT z=4"),
                                                            ("psat_z16", "PSAT z=16")]  # fmt: skip
    table5 = tables["table5"]
    assert [(r.key, r.label) for r in table5[:2]] == [
        ("sat_mobilenet_v1", "MobileNetV1 (SAT)"),
        ("sat_mobilenet_v3_small", "MobileNetV3-Small (SAT)"),
    ]
    assert table5[-1] is psat and len(table5) == 5
    assert all(lightweight[r.key].spec(job).arch == r.key.removeprefix("sat_") for r in table5[:-1])


def test_every_model_is_trained_and_every_row_evaluated_once_per_seed():
    job = parse_config({
        "name": "r", "model": {"embedding_dim": 8},
        "reproduce": {"embedding_dims": [8], "seeds": 3, "lightweight": ["ghostnet"]},
    })  # fmt: skip
    plans = model_plans(job)
    first = [p for p in plans if p.seed == 0]
    assert len(plans) == 3 * len(first)
    for seed, suffix in ((1, "_s1"), (2, "_s2")):
        again = [p for p in plans if p.seed == seed]
        assert [p.name for p in again] == [p.name + suffix for p in first]
        assert [replace(p, name=f.name, seed=0) for p, f in zip(again, first, strict=True)] == first
        assert {p.training_seed(job) for p in again} == {job.training.seed + seed}
    psat = table_rows(job)["table1"][-1]
    assert seeded(psat, 2) == replace(psat, key="psat_z8_s2", models=("h8_linf_s2", "h8_l2_s2",
                                                                      "h8_l1_s2"))  # fmt: skip
    assert seeded(psat, 0) == psat


def test_each_models_run_records_its_own_plan(tmp_path):
    from orchestrator.runtime.tracking import Tracker
    from orchestrator.training.driver import plan_params

    job = parse_config({
        "name": "r", "model": {"embedding_dim": 16}, "reproduce": {"embedding_dims": [2, 16]},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "training": {"seed": 5},
    })  # fmt: skip
    tracker = Tracker(job)
    seeds = job.model_copy(update={"reproduce": job.reproduce.model_copy(update={"seeds": 2})})
    (second,) = [p for p in model_plans(seeds) if p.name == "at_max_s1"]
    assert plan_params(tracker, second)["training.seed"] == "6"
    for plan in model_plans(job):  # Figure 2's members their own embedding dimension
        params = plan_params(tracker, plan)
        dim = "none (plain ResNet)" if plan.embedding_dim is None else str(plan.embedding_dim)
        if plan.arch:  # Table 5's lightweight networks: their own architecture
            dim = "none (plain network)"
            assert params["model.arch"] == plan.arch != job.model.arch
        assert params["model.embedding_dim"] == dim
        norms = ",".join(plan.norms) or "none"
        assert (params["plan.method"], params["plan.norms"]) == (plan.method, norms)
        assert params["training.epochs"] == str(job.training.epochs)
    assert {p.embedding_dim for p in model_plans(job)} == {None, 2, 16}


def _scores(n: int = 400, **accuracy: float) -> dict[str, torch.Tensor]:
    """Table 1's columns image by image: the first ``accuracy * n`` images right."""
    columns = {"clean": 0.9, "linf": 0.3, "l2": 0.3, "l1": 0.3, "max": 0.2, "avg": 0.3}
    columns |= {"trade_off": 0.4} | accuracy
    return {c: (torch.arange(n) < round(v * n)).float() for c, v in columns.items()}


@pytest.mark.parametrize(
    ("delta", "nat_avg", "outcome"),
    [(0.1, 0.05, "holds"), (-0.1, 0.25, "does not hold"), (0.0025, 0.15, "inconclusive")],
)
def test_claims_are_judged_by_a_paired_bootstrap(delta, nat_avg, outcome):
    job = parse_config(
        {"name": "r", "model": {"embedding_dim": 8}, "reproduce": {"embedding_dims": [8]}}
    )
    tables = table_rows(job)
    scores = {row.key: _scores() for rows in tables.values() for row in rows}
    scores["psat_z8"] = _scores(trade_off=0.4 + delta, max=0.2 + delta)
    scores["psat_z8_nat"] = _scores(avg=nat_avg)  # PSAT's avg: 0.3, halved 0.15
    claims = [c for c in paper_claims(scores, tables) if c.table not in ("Table 5", "Table 6")]
    assert len(claims) == 1 + 4 + 1 + 1  # best member, max/avg/msd/mng, + H_NAT, Table 4
    assert [claim.outcome for claim in claims] == [outcome] * len(claims)
    for claim in claims:
        assert claim.low <= claim.difference <= claim.high
        assert (claim.low > 0) == (outcome == "holds") and (claim.high < 0) == (
            outcome == "does not hold"
        )
        assert "95% CI [" in claim.line()
    beats = claims[1]  # PSAT vs AT_max on the trade-off, one image is 0.25 points
    assert beats.difference == pytest.approx(100 * delta)


@pytest.mark.parametrize(
    ("direct", "psat", "outcome"),
    [(0.46, 0.46, "holds"), (0.36, 0.30, "does not hold"), (0.4025, 0.3825, "inconclusive")],
)
def test_table6_direct_aggregation_and_its_claims(direct, psat, outcome):
    """Table 6: AT_ℓ∞, AT_ℓ2, AT_ℓ1 aggregated directly under both strategies; it beats every
    multi-norm model (each at 0.40 here), and PSAT is within 2 points of it (PSAT + 2 points
    against it)."""
    job = parse_config(
        {"name": "r", "model": {"embedding_dim": 8}, "reproduce": {"embedding_dims": [8]}}
    )
    tables = table_rows(job)
    specialists = ("at_linf", "at_l2", "at_l1")
    assert [(r.key, r.models, r.strategy) for r in tables["table6"]] == [
        ("psat_z8", ("h8_linf", "h8_l2", "h8_l1"), "lowest_entropy"),
        ("direct_lowest_entropy", specialists, "lowest_entropy"),
        ("direct_average", specialists, "average"),
    ]
    scores = {row.key: _scores() for rows in tables.values() for row in rows}
    scores["direct_lowest_entropy"] = _scores(trade_off=direct)
    scores["psat_z8"] = _scores(trade_off=psat)
    claims = [c for c in paper_claims(scores, tables) if c.table == "Table 6"]
    assert [c.text for c in claims] == [
        *(f"direct aggregation's trade-off beats AT_{m}" for m in ("max", "avg", "msd", "mng")),
        "PSAT's trade-off is within 2 points of direct aggregation's",
    ]
    assert [c.outcome for c in claims] == [outcome] * 5
    assert claims[-1].difference == pytest.approx(100 * (psat - direct) + 2, abs=1e-4)


def test_claims_are_judged_once_when_the_suite_is_the_papers():
    """Under `evaluation.suite: paper` the full evaluation is the paper's protocol: one verdict
    per claim, not the same one twice."""
    sections = {"model": {"embedding_dim": 8}, "reproduce": {"embedding_dims": [8]}}
    assert judged_protocols(parse_config({"name": "r", **sections})) == ("paper", "full")
    job = parse_config({"name": "r", **sections, "evaluation": {"suite": "paper"}})
    assert judged_protocols(job) == ("paper",)
    tables = table_rows(job)
    scores = {row.key: _scores() for rows in tables.values() for row in rows}
    claims = [c for p in judged_protocols(job) for c in paper_claims(scores, tables, p)]
    header, _, *rows = claims_table(claims)
    assert header == "| Table | Claim | the paper's protocol |"
    assert len(rows) == len(claims) == 7 + 4 + 5  # and Tables 5 and 6's


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"reproduce": {"embedding_dims": [0, 8]}}, "reproduce.embedding_dims"),
        ({"reproduce": {"concurrent_trainers": 0}}, "reproduce.concurrent_trainers"),
        ({"reproduce": {"seeds": 0}}, "reproduce.seeds"),
        ({"reproduce": {"lightweight": ["mobilenet_v2"]}}, "reproduce.lightweight"),
        ({"evaluation": {"gate_temperature": -1}}, "evaluation.gate_temperature"),
        ({"evaluation": {"adaptve": True}}, "evaluation.adaptve"),
    ],
)
def test_bad_reproduce_settings_name_the_field(section, field):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config({"name": "r", **section})


def test_member_parity_honours_or_refuses_every_h_only_setting(tmp_path):
    """`bench/member_parity.py --h-set`: H's own settings reach H's plans (its embedding
    dimension included), AT keeps the shared ones; a shared setting is refused in one line."""
    import runpy

    bench = runpy.run_path(str(ROOT / "bench" / "member_parity.py"))
    base = {"name": "parity", "model": {"embedding_dim": 32}}
    h_only = {"model": {"embedding_dim": 64}, "training": {"epochs": 8}}
    jobs = {"AT": parse_config(base), "H": parse_config(deep_merge(base, h_only))}
    tasks = list(bench["model_tasks"](jobs, [0, 1], ["linf"], ["AT", "H"]))
    plans = {key: (plan.embedding_dim, job["training"]["epochs"], job["training"]["seed"])
             for key, job, plan in tasks}  # fmt: skip
    epochs = jobs["AT"].training.epochs
    assert plans == {
        (0, "linf", "AT"): (None, epochs, 0), (0, "linf", "H"): (64, 8, 0),
        (1, "linf", "AT"): (None, epochs, 1), (1, "linf", "H"): (64, 8, 1),
    }  # fmt: skip
    assert bench["h_only"](["model.embedding_dim=64", "training.epochs=8"])
    for shared in ("training.seed=3", "attacks.eval.linf.steps=1", "evaluation.suite=paper"):
        with pytest.raises(SystemExit) as refused:
            bench["h_only"]([shared])
        assert refused.value.code == 2
    proc = subprocess.run(  # as a user meets it
        [sys.executable, str(ROOT / "bench" / "member_parity.py"), "--h-set", "data.eval_size=9"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr == (
        "member_parity.py: error: --h-set data.eval_size: AT and H share it (data, seeds, the "
        "evaluation, where runs go); set it for both with --set\n"
    )


def test_a_report_over_seeds_shows_their_mean_and_spread_and_judges_over_both(agg_rows, tmp_path):
    """`reproduce.seeds: 2`, each row's two seeds two real evaluated rows (conftest's
    `agg_rows`): every table cell is the seeds' mean ± their standard deviation, results.json
    keeps each seed's row, and each verdict is the two-stage bootstrap's over (seeds, images)."""
    import json
    import statistics

    from orchestrator.evaluation.claims import judge
    from orchestrator.evaluation.report import COLUMNS
    from orchestrator.evaluation.reproduction import Seeded, write_report

    evaluated, _, _ = agg_rows
    job = parse_config({
        "name": "r", "data": {"dataset": "digits"},
        "model": {"arch": "resnet10", "embedding_dim": 8},
        "reproduce": {"embedding_dims": [8], "seeds": 2, "lightweight": ["ghostnet"],
                      "nat_member": False},
    })  # fmt: skip
    tables = table_rows(job)
    pairs = {None: ("member.linf", "member.l2"), "lowest_entropy": ("lowest_entropy", "average"),
             "average": ("average", "lowest_entropy")}  # fmt: skip
    results = {row.key: Seeded([evaluated[k] for k in pairs[row.strategy]])
               for rows in tables.values() for row in rows}  # fmt: skip
    claims = write_report(job, tables, results, tmp_path, {"training": 3725.4, "evaluation": 61})

    table1 = (tmp_path / "table1.md").read_text().splitlines()
    psat = next(line for line in table1 if line.startswith("| PSAT |"))
    first, second = (evaluated[k].row for k in pairs["lowest_entropy"])
    for c, cell in zip(COLUMNS, psat.split("|")[2:], strict=False):
        mean, sd = (first[c] + second[c]) / 2, statistics.stdev([first[c], second[c]])
        assert cell.strip() == f"{100 * mean:.2f}% ± {100 * sd:.2f}"
    report = (tmp_path / "report.md").read_text()
    assert "standard deviation over seeds" in report
    assert "Wall time: training 1h 02m 05s, evaluation 1m 01s." in report
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["seeds"] == 2
    assert payload["wall_seconds"] == {"training": 3725.4, "evaluation": 61}
    assert payload["results"]["psat_z8_s1"]["row"] == second
    assert payload["results"]["psat_z8"]["row"] == first
    (lightweight,) = [c for c in claims if c.table == "Table 5" and c.protocol == "paper"]
    ours = results["psat_z8"].examples("paper")["trade_off"]
    assert ours.shape == (2, len(evaluated["average"].scores["paper"]["trade_off"]))
    theirs = results["sat_ghostnet"].examples("paper")["trade_off"]
    outcome, difference, low, high = judge(ours, theirs)
    assert (lightweight.outcome, lightweight.low, lightweight.high) == (outcome, low, high)
    assert lightweight.text == "PSAT's trade-off beats GhostNet (SAT)"
    assert {f"table{i}.md" for i in range(1, 7)} <= {p.name for p in tmp_path.iterdir()}
