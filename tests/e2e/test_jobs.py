"""Whole jobs end to end on Ray, each as a user runs it: the quickstart through `psat`, an
aggregation of members from a training run, and a tiny reproduction.

Slow (minutes on two cores): marked `slow`, still run by the README's `python -m pytest`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import ROOT, agg_job, locations, psat, ray_tasks, training_run
from mlflow.tracking import MlflowClient

from orchestrator.aggregate import aggregate
from orchestrator.config import parse_config
from orchestrator.evaluation.claims import Claim, paper_claims
from orchestrator.evaluation.report import COLUMNS
from orchestrator.evaluation.rows import Row
from orchestrator.evaluation.tasks import evaluate_row
from orchestrator.registry.pull import load_ensemble
from orchestrator.registry.register import CANDIDATE, CHAMPION
from orchestrator.reproduce import table_rows
from orchestrator.runtime.terminal import duration
from orchestrator.runtime.tracking import Tracker, tracking
from psat_core.checkpoint import ensemble_from_checkpoints
from psat_core.data import load_dataset
from psat_core.metrics import standard_error
from psat_core.models import NoiseGenerator, count_parameters, create_model

TABLE_FILES = tuple(f"table{i}" for i in range(1, 7))  # the reproduction's, as .md and .png


# ----------------------------------------------------- the quickstart: psat run, then psat evaluate


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_its_model_loads(tmp_path, shared_ray, ray_address):
    sets = {
        "training.epochs": 1,
        "data.train_size": 96,
        "data.val_size": 16,
        "data.eval_size": 6,
        "model.embedding_dim": 4,
        **{f"attacks.train.{n}.steps": 1 for n in ("linf", "l2", "l1")},
        **{f"attacks.eval.{n}.steps": 2 for n in ("linf", "l2", "l1")},
        "evaluation.apgd_steps": 2,
        "evaluation.square_queries": 5,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    config = ROOT / "jobs" / "configs" / "quickstart.yaml"
    proc = psat("run", "--config", str(config), *args, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for column in ("Clean", "ℓ∞", "ℓ2", "ℓ1", "Max", "Avg", "Trade-off"):
        assert column in proc.stdout
    # only psat speaks: no MLflow progress bars or registration prints
    for chatter in ("Downloading artifacts", "Successfully registered", "Created version", "\r"):
        assert chatter not in proc.stdout + proc.stderr, chatter
    # nor Ray's token-authentication note, nor log records: psat's first line comes first
    logged = [line for line in (proc.stdout + proc.stderr).splitlines()
              if re.search(r" (INFO|WARNING) ", line)]  # fmt: skip
    assert not logged and proc.stdout.startswith("training linf, l2, l1"), logged
    assert "registered models:/psat-digits/1" in proc.stdout
    uri = re.search(r"models:/psat-digits@champion", proc.stdout)
    assert uri, proc.stdout
    # the registered ensemble loads as the README says (in a fresh process: test_registry)
    with tracking(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        model = mlflow.pyfunc.load_model("models:/psat-digits@champion")
    answers = model.predict(np.random.rand(3, 1, 8, 8).astype("float32"))
    assert len(answers) == 3 and {"member", "class"} <= set(answers.columns)

    before = set(ray_tasks(shared_ray, "evaluate_chunk"))
    evaluated = psat("evaluate", "--config", str(config), *args, "--model",
                     "models:/psat-digits@champion", "--set", f"resources.address={ray_address}",
                     cwd=tmp_path, timeout=600)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = [line for line in evaluated.stdout.splitlines() if line.startswith("PSAT ")]
    assert len(rows) == 2 and all(line.count("%") == 7 for line in rows)
    progress = [line for line in evaluated.stdout.splitlines() if "images evaluated" in line]
    assert {line.split("]")[0] for line in progress} == {"[lowest_entropy", "[average"}
    # on the cluster: each row's chunk a Ray task, none in psat evaluate's own process
    ran = ray_tasks(shared_ray, "evaluate_chunk")
    assert len([t for t in ran.values() if t.task_id not in before]) == 2


# ----------------------------------------------- aggregate: members from a training run, registered


@pytest.mark.slow
def test_aggregate_end_to_end(
    tmp_path, members, monkeypatch, shared_ray, torch_threads, mlflow_server
):
    members = locations(members)  # strings, as a training run's tags hold them
    monkeypatch.chdir(tmp_path)
    job = agg_job(tmp_path, tracking={"uri": mlflow_server, "experiment": "agg-e2e"})
    train = training_run(Tracker(job), job, members)
    lines: list[str] = []
    before = ray_tasks(shared_ray, "evaluate_chunk")
    first = aggregate(job, echo=lines.append, train_run=train)  # members from the training run

    # 5 rows of one chunk each, `evaluation.concurrent_chunks` (2) at a time
    deadline = time.monotonic() + 30  # Ray records task events a second or so late
    while True:
        rows = [t for k, t in ray_tasks(shared_ray, "evaluate_chunk").items() if k not in before]
        ended = [t for t in rows if t.end_time_ms]
        if len(ended) == len(first.rows) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rows) == len(ended) == len(first.rows) == 5
    spans = [(t.start_time_ms, t.end_time_ms) for t in rows]  # each with ms of skew: 10 ms
    assert max(sum(s <= start < e - 10 for s, e in spans) for start, _ in spans) <= 2, spans
    # the 2 ensemble rows start once the 3 member rows whose examples they score have ended
    rows.sort(key=lambda t: t.creation_time_ms)
    # (each time recorded by its own process: a few ms of skew between them)
    assert max(t.end_time_ms for t in rows[:3]) <= min(t.start_time_ms for t in rows[3:]) + 10

    assert first.members == members
    assert (first.registration.version, first.registration.champion) == (1, True)
    client = MlflowClient(job.tracking.resolved_uri())
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["psat.role"] == "aggregate" and run.data.tags["psat.job"] == "agg"
    assert run.data.tags["psat.train_run"] == train
    assert run.data.tags["psat.registered_version"] == "1"
    metrics = run.data.metrics
    assert metrics["trade_off"] == first.rows["lowest_entropy"]["trade_off"]
    assert {f"{r}.{c}" for r in first.rows for c in COLUMNS} <= set(metrics)
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"report.md", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert plots == {"plots/accuracy.png", "plots/member_choice.png"}
    report = client.download_artifacts(first.run_id, "report.md", str(tmp_path))
    text = Path(report).read_text()
    assert "## Registry" in text and "models:/psat-agg/1" in text
    assert any("champion -> v1" in line for line in lines)
    assert any(line.startswith("PSAT lowest entropy") for line in lines)
    _check_evidence(client, first, job)
    # progress, not on a terminal: one line per finished row, its images and robust points
    for key, row in first.rows.items():
        robust = round(row["max"] * first.samples)
        done = f"[{key}] {first.samples} images evaluated, {robust} robust to every attack; "
        assert sum(line.startswith(done) for line in lines) == 1, (done, lines)

    # the same members again: not better, so champion stays, unless forced
    second = aggregate(job, members, echo=lines.append)
    assert (second.registration.version, second.registration.champion) == (2, False)
    third = aggregate(job, members, echo=lines.append, force_champion=True)
    assert (third.registration.version, third.registration.champion) == (3, True)
    aliases = client.get_registered_model("psat-agg").aliases
    assert {a: int(v) for a, v in aliases.items()} == {CANDIDATE: 3, CHAMPION: 3}

    images = load_dataset("digits", "test", "unused").to_float()[:5]
    loaded = load_ensemble("models:/psat-agg@champion", tracking_uri=job.tracking.resolved_uri())
    pd.testing.assert_frame_equal(
        pd.DataFrame(loaded.predict(images)),
        pd.DataFrame(ensemble_from_checkpoints(members).predict(images)),
    )


def _check_evidence(client: MlflowClient, result, job) -> None:
    """What MLflow 3 shows of the version, read back from the server: Table 1's metrics on the
    logged model and its version, measured on the evaluation split; the splits as datasets;
    Table 1 as a table; the description."""
    from orchestrator.runtime.ray_session import data_uri
    from orchestrator.runtime.shards import read_manifest

    digests = read_manifest(data_uri(job))["digests"]
    version = client.get_model_version("psat-agg", "1")
    best = result.rows["lowest_entropy"]
    assert version.description.startswith(
        f"PSAT lowest entropy: Clean {100 * best['clean']:.2f}%, ℓ∞ "
    ) and f"Trade-off {100 * best['trade_off']:.2f}% on 8 digits test images" in (
        version.description
    )
    model = client.get_logged_model(version.source.removeprefix("models:/"))  # its logged model
    assert {"name": "psat-agg", "version": "1"} in json.loads(model.tags["mlflow.modelVersions"])
    linked = {m.key: m for m in model.metrics}
    assert linked["lowest_entropy.trade_off"].value == best["trade_off"]
    assert linked["member.l1.l1"].value == result.rows["member.l1"]["l1"]
    assert {(m.dataset_name, m.dataset_digest) for m in model.metrics} == {
        ("digits-eval", digests["eval"])
    }
    inputs = client.get_run(result.run_id).inputs.dataset_inputs
    logged = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs
    }
    assert {c: (d.name, d.digest) for c, d in logged.items()} == {
        "training": ("digits-train", digests["train"]),
        "validation": ("digits-val", digests["val"]),
        "evaluation": ("digits-eval", digests["eval"]),
    }
    table = json.loads(Path(client.download_artifacts(result.run_id, "table1.json")).read_text())
    assert [row[0] for row in table["data"]] == [
        "H_linf", "H_l2", "H_l1", "PSAT lowest entropy", "PSAT average"
    ]  # fmt: skip
    assert table["columns"][-1] == "Trade-off"
    assert table["data"][3][-1] == pytest.approx(best["trade_off"], rel=1e-6)


# --------------------------------------------------- reproduce: the paper's tables and claims, tiny


def _cells(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.mark.slow
@pytest.mark.usefixtures("tracking_store")
def test_tiny_reproduction_end_to_end(shared_ray, tiny_job, tmp_path):
    from orchestrator.reproduce import reproduce
    from orchestrator.runtime.ray_session import data_uri
    from orchestrator.runtime.shards import materialize

    out = tmp_path / "reproduce"
    job = parse_config(
        tiny_job(
            "repro",
            data={"train_size": 64, "val_size": 16, "eval_size": 8},
            training={"epochs": 1, "members": ["linf", "l1"]},  # two norms: 10 models
            # Table 5 with one lightweight network; H_NAT's rows are planned like any other
            # (test_reproduce): none here, one Ray Train run fewer
            reproduce={
                "embedding_dims": [4],
                "concurrent_trainers": 4,
                "output": str(out),
                "lightweight": ["mobilenet_v3_small"],
                "nat_member": False,
            },  # fmt: skip
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
    assert params["sat_mobilenet_v3_small"]["model.arch"] == "mobilenet_v3_small"
    assert params["sat_mobilenet_v3_small"]["plan.norms"] == "linf,l1"
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
    # Table 5: the lightweight network beside PSAT, its parameters timm's
    table5 = _cells((folder / "table5.md").read_text())
    light = count_parameters(create_model("mobilenet_v3_small", num_classes=10, in_channels=1))
    assert results["sat_mobilenet_v3_small"]["parameters"] == light
    assert table5["MobileNetV3-Small (SAT)"][len(COLUMNS)] == f"{light:,}"
    # Table 2: PSAT at each dimension with its accuracies
    assert list(_cells((folder / "table2.md").read_text())) == ["PSAT z=4"]
    # Table 6: the two AT specialists aggregated directly, twice the plain ResNet's parameters
    table6 = _cells((folder / "table6.md").read_text())
    assert results["direct_average"]["parameters"] == 2 * payload["plain_parameters"]
    assert table6["Direct aggregation"][len(COLUMNS) :] == [
        f"{2 * payload['plain_parameters']:,}", "2.00x"
    ]  # fmt: skip
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
                                        True)  # fmt: skip
        assert member.row == results[name]["row"]
        assert examples and all(e.shape[:2] == (3, 8) for e in examples[0].values())
        lent.append(examples)
    again, _ = evaluate_row(job_dict, checkpoints, "lowest_entropy", manifest["eval"], False,
                            *lent)  # fmt: skip
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
    # each phase's wall time: printed as it ends, in report.md, results.json and the run
    assert re.search(r"^trained 10 models in \d+(m \d\d)?s$", "\n".join(lines), re.M), lines
    assert re.search(r"^evaluated 14 rows in \d+(m \d\d)?s$", "\n".join(lines), re.M), lines
    assert set(payload["wall_seconds"]) == {"training", "evaluation"}
    assert run.data.metrics["wall_seconds.training"] == payload["wall_seconds"]["training"]
    assert f"training {duration(payload['wall_seconds']['training'])}" in report
