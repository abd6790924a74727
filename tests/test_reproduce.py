"""The reproduction job: which models and rows, the paper's claims, and a tiny run end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from orchestrator.config import parse_config
from orchestrator.evaluation.claims import Claim, claims_table, judged_protocols, paper_claims
from orchestrator.evaluation.rows import Row
from orchestrator.evaluation.tasks import evaluate_row
from orchestrator.reproduce import model_plans, table_rows
from psat_core.metrics import standard_error
from psat_core.models import NoiseGenerator, count_parameters

TABLE_FILES = ("table1", "table3", "table4")


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
    }
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


def test_each_models_run_records_its_own_plan(tmp_path):
    from orchestrator.runtime.tracking import Tracker
    from orchestrator.training.driver import plan_params

    job = parse_config({
        "name": "r", "model": {"embedding_dim": 16}, "reproduce": {"embedding_dims": [2, 16]},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })  # fmt: skip
    tracker = Tracker(job)
    for plan in model_plans(job):  # Figure 2's members their own embedding dimension
        params = plan_params(tracker, plan)
        dim = "none (plain ResNet)" if plan.embedding_dim is None else str(plan.embedding_dim)
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
    claims = paper_claims(scores, tables)
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
    assert len(rows) == len(claims) == 7


def _cells(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.mark.slow
def test_tiny_reproduction_end_to_end(local_ray, tiny_job, tmp_path):
    import mlflow

    from orchestrator.evaluation.report import COLUMNS
    from orchestrator.reproduce import reproduce
    from orchestrator.runtime.ray_session import data_uri
    from orchestrator.runtime.shards import materialize

    out = tmp_path / "reproduce"
    job = parse_config(
        tiny_job(
            "repro",
            data={"train_size": 64, "val_size": 16, "eval_size": 8},
            training={"epochs": 1, "members": ["linf", "l1"]},  # two norms: 10 models
            reproduce={"embedding_dims": [4], "concurrent_trainers": 4, "output": str(out)},
        )
    )
    lines: list[str] = []
    result = reproduce(job, echo=lines.append)
    folder = Path(result["output"])
    assert folder == out / "repro"
    produced = {p.name for p in folder.iterdir()}
    expected = {f"{t}.{ext}" for t in TABLE_FILES for ext in ("md", "png")}
    expected |= {"figure2.png", "report.md", "results.json"}
    assert expected <= produced
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    for name in expected - {"results.json"}:
        assert (folder / name).stat().st_size > 100

    client = mlflow.MlflowClient(job.tracking.uri)
    logged = {Path(a.path).name for a in client.list_artifacts(result["run_id"], "reproduce")}
    assert expected <= logged
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    # each model's run records its own plan (`plan_params`)
    models = client.search_runs([run.info.experiment_id], "tags.`psat.role` = 'model'")
    params = {m.info.run_name.removeprefix("repro-"): m.data.params for m in models}
    assert len(params) == 10
    assert params["h4_l1"]["model.embedding_dim"] == "4"
    assert params["at_max"]["model.embedding_dim"] == "none (plain ResNet)"
    assert (params["at_max"]["plan.method"], params["at_l1"]["plan.norms"]) == ("max", "l1")
    assert params["at_max"]["plan.norms"] == "linf,l1"
    payload = json.loads((folder / "results.json").read_text())
    results = payload["results"]
    assert run.data.metrics["psat_z4.trade_off"] == pytest.approx(
        results["psat_z4"]["row"]["trade_off"]
    )

    # every number in the tables is an evaluation's: each cell is its row's value, formatted
    for table in TABLE_FILES:
        cells = _cells((folder / f"{table}.md").read_text())
        rows = [Row(**r) for r in payload["tables"][table]]
        assert list(cells) == [r.label for r in rows]
        for row in rows:
            values, scores = results[row.key]["row"], results[row.key]["scores"]["full"]
            errors = {column: standard_error(torch.tensor(v)) for column, v in scores.items()}
            shown = cells[row.label][: len(COLUMNS)]
            assert shown == [f"{100 * values[c]:.2f}% ± {100 * errors[c]:.2f}" for c in COLUMNS]
            assert all(len(scores[c]) == 8 and torch.tensor(scores[c]).mean() == values[c]
                       for c in COLUMNS)  # fmt: skip
    table1 = _cells((folder / "table1.md").read_text())
    assert int(table1["PSAT"][len(COLUMNS)].replace(",", "")) == results["psat_z4"]["parameters"]
    # AT_mng trains the plain ResNet and a noise generator: Table 1 counts both
    generator = count_parameters(NoiseGenerator(1))
    assert results["at_mng"]["parameters"] == payload["plain_parameters"] + generator
    assert int(table1["AT_mng"][len(COLUMNS)].replace(",", "")) == results["at_mng"]["parameters"]
    # each claim judged under both protocols, from each protocol's own numbers
    by_protocol = {c["protocol"] for c in payload["claims"]}
    assert by_protocol == {"paper", "full"}
    for protocol in ("paper", "full"):
        rows = {
            key: {c: torch.tensor(v) for c, v in value["scores"][protocol].items()}
            for key, value in results.items()
        }
        judged = [c for c in payload["claims"] if c["protocol"] == protocol]
        assert [Claim(**c) for c in judged] == paper_claims(rows, table_rows(job), protocol)
    report = (folder / "report.md").read_text()
    assert "| Table | Claim | the paper's protocol | psat's full evaluation |" in report
    paper1 = _cells((folder / "table1_paper.md").read_text())
    assert paper1["PSAT"][1].startswith(f"{100 * results['psat_z4']['paper']['linf']:.2f}% ± ")
    assert results["psat_z4"]["paper"]["linf"] >= results["psat_z4"]["row"]["linf"]
    saving = float(re.search(r"([\d.]+)%", table1["PSAT"][-1]).group(1))
    assert saving == pytest.approx(
        100 * (1 - results["psat_z4"]["parameters"] / payload["plain_parameters"]), abs=0.01
    )

    # ... and a real one: evaluating PSAT again from its checkpoints gives the same row
    manifest = materialize(job, data_uri(job), 1)
    train = client.search_runs([run.info.experiment_id], "tags.`psat.role` = 'reproduce'")[0]
    checkpoints = {m: train.data.tags[f"psat.checkpoint.{m}"] for m in ("h4_linf", "h4_l1")}
    # the member rows first, each lending the examples PSAT's transfer attack scores
    job_dict, lent = job.model_dump(), []
    for name, checkpoint in checkpoints.items():
        member, examples = evaluate_row(job_dict, {name: checkpoint}, None, manifest["eval"],
                                        None, "", True)  # fmt: skip
        assert member.row == results[name]["row"]
        assert examples and all(e.shape[:2] == (3, 8) for e in examples.values())
        lent.append(examples)
    again, _ = evaluate_row(job_dict, checkpoints, "lowest_entropy", manifest["eval"], None, "",
                            False, *lent)  # fmt: skip
    assert again.row == results["psat_z4"]["row"]
    # the adaptive and third-party attacks ran and count in the norm they attack
    row = results["psat_z4"]["row"]
    for name in (
        "linf/gate",
        "linf/confident",
        "linf/torchattacks.APGD",
        "l1/foolbox.SparseL1Descent",
    ):
        assert row[name.split("/")[0]] <= row[name]
    assert "evaluating" in "\n".join(lines)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"reproduce": {"embedding_dims": [0, 8]}}, "reproduce.embedding_dims"),
        ({"reproduce": {"concurrent_trainers": 0}}, "reproduce.concurrent_trainers"),
        ({"evaluation": {"gate_temperature": -1}}, "evaluation.gate_temperature"),
        ({"evaluation": {"adaptve": True}}, "evaluation.adaptve"),
    ],
)
def test_bad_reproduce_settings_name_the_field(section, field):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config({"name": "r", **section})
