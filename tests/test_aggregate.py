"""orchestrator.aggregate: evaluation (Tables 3 and 4), report, plots, and the job's refusals
(the job end to end on Ray: e2e/test_jobs.py).

Members are tiny random hypernetwork ResNets written with `save_member` (conftest's `members`);
MLflow is a real SQLite store in a temporary directory.
"""

from __future__ import annotations

import io
import re

import pandas as pd
import pytest
import ray
from helpers import (
    AGG_EVAL,
    agg_job,
    locations,
    psat,
    training_run,
    write_member,
)
from mlflow.tracking import MlflowClient

from orchestrator.aggregate import (
    aggregate,
    flat_metrics,
    member_checkpoints,
    parameter_counts,
)
from orchestrator.evaluation.figures import accuracy_figure, choice_figure
from orchestrator.evaluation.report import COLUMNS, markdown_report
from orchestrator.evaluation.rows import Evaluation, aggregation_rows
from orchestrator.evaluation.tasks import lenders
from orchestrator.runtime.shards import read_arrays
from orchestrator.runtime.tracking import Tracker
from psat_core.accounting import parameter_report
from psat_core.checkpoint import ensemble_from_checkpoints, read_spec
from psat_core.ensemble import STRATEGIES

NORMS = ("linf", "l2", "l1")
EVAL = AGG_EVAL  # the test images agg_job evaluates


@pytest.fixture(scope="module")
def evaluation(agg_rows) -> tuple[Evaluation, str]:
    """conftest's `agg_rows` (the rows in chunks of 4 images) as the aggregation's tables."""
    rows, eval_uri, _ = agg_rows
    return Evaluation.of(rows), eval_uri


def test_evaluation_has_tables_3_and_4(evaluation):
    result, _ = evaluation
    rows, choice = result.rows, result.choice
    assert set(rows) == {"member.linf", "member.l2", "member.l1", "lowest_entropy", "average"}
    crosscheck = {"linf/torchattacks.PGD", "l2/torchattacks.APGD", "l1/foolbox.SparseL1Descent"}
    adaptive = {f"{n}/{a}" for n in NORMS for a in ("gate", "confident", "transfer")}
    ours = {f"{n}/{a}" for n in NORMS for a in ("pgd", "apgd-ce", "apgd-t")}
    for key, row in rows.items():
        attacks = {k for k in row if "/" in k}
        # ours and the cross-check on every model; the gate's attacks on ensembles only
        assert ours | crosscheck <= attacks
        assert (adaptive <= attacks) == (not key.startswith("member."))
        assert set(COLUMNS) <= set(row)
        assert all(0.0 <= row[c] <= 1.0 for c in row)
        assert (
            row["max"] <= min(row[n] for n in NORMS) <= max(row[n] for n in NORMS) <= row["clean"]
        )
        for attack in attacks:  # a norm's accuracy is the worst over its attacks
            assert row[attack.split("/")[0]] <= row[attack]
    assert set(choice) == {"lowest_entropy", "average"}
    for per_input in choice.values():
        assert list(per_input)[0] == "clean"
        assert set(per_input) == {"clean"} | {k for k in rows["average"] if "/" in k}
        for fractions in per_input.values():
            assert list(fractions) == list(NORMS)
            assert sum(fractions.values()) == pytest.approx(1.0)
    assert result.samples == EVAL and result.device == "cpu"


def test_clean_evaluation_agrees_with_the_registered_predictor(evaluation, members):
    members = locations(members)  # strings, as a training run's tags hold them
    result, eval_uri = evaluation
    data = read_arrays(eval_uri)
    ensemble = ensemble_from_checkpoints(members)
    for strategy in ("lowest_entropy", "average"):
        frame = pd.DataFrame(ensemble.predict(data.to_float(), strategy))
        accuracy = (frame["class"].to_numpy() == data.labels.numpy()).mean()
        assert result.rows[strategy]["clean"] == pytest.approx(accuracy)
        answered = frame["member"].value_counts(normalize=True)
        for norm in NORMS:
            expected = answered.get(norm, 0.0)
            assert result.choice[strategy]["clean"][norm] == pytest.approx(expected)


def test_ensemble_rows_borrow_their_member_rows_examples_under_the_strong_suite(tmp_path):
    members = {n: f"/ckpt/{n}" for n in NORMS}
    rows = aggregation_rows(members, STRATEGIES)
    member_rows = [f"member.{n}" for n in NORMS]
    borrowers = {s: member_rows for s in STRATEGIES}
    assert lenders(agg_job(tmp_path), rows) == (borrowers, set(member_rows))
    # an ensemble with a member no row evaluates alone crafts its transfer itself
    rows = [row for row in rows if row.key != "member.l2"]
    assert lenders(agg_job(tmp_path), rows) == ({}, set())
    paper = agg_job(tmp_path, evaluation={"suite": "paper"})  # no transfer attack to feed
    assert lenders(paper, aggregation_rows(members, STRATEGIES)) == ({}, set())


def test_parameter_counts_match_the_accounting(members):
    members = locations(members)  # strings, as a training run's tags hold them
    counts = parameter_counts({n: read_spec(d) for n, d in members.items()})
    report = parameter_report("resnet10", 10, 4, members=3, in_channels=1)
    assert counts["member.linf"] == report.member
    assert counts["aggregated"] == report.aggregated
    assert counts["plain"] == report.plain
    assert counts["saving"] == pytest.approx(report.saving)


def test_report_metrics_and_plots(evaluation, members, tmp_path):
    members = locations(members)  # strings, as a training run's tags hold them
    result, _ = evaluation
    job = agg_job(tmp_path)
    counts = parameter_counts({n: read_spec(d) for n, d in members.items()})
    report = markdown_report(job, members, result, counts)
    for heading in ("Table 3", "Table 4", "Every attack", "Which member answers", "Parameters"):
        assert heading in report
    le = result.rows["lowest_entropy"]
    assert f"| PSAT (Lowest entropy) | {100 * le['clean']:.2f}% |" in report
    assert f"| H_l1 | {100 * result.rows['member.l1']['clean']:.2f}% |" in report
    assert f"| PSAT (3 members) | {counts['aggregated']:,} |" in report
    # the "every attack" table: per norm, the points each attack found add up to clean - norm
    table = report.split("## Every attack")[1].split("## Which member")[0]
    header, *lines = [line for line in table.splitlines() if line.startswith("| ")]
    attacks = [cell.strip() for cell in header.strip("|").split("|")][1:]
    for line in lines:
        label, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        key = {"H_linf": "member.linf", "PSAT (Lowest entropy)": "lowest_entropy"}.get(label)
        if key is None:
            continue
        row = result.rows[key]
        for norm, symbol in (("linf", "ℓ∞"), ("l1", "ℓ1")):
            found = [
                int(re.search(r"\((\d+) found\)", cell).group(1))
                for attack, cell in zip(attacks, cells, strict=True)
                if attack.startswith(symbol + " ") and cell != "-"
            ]
            assert sum(found) == round((row["clean"] - row[norm]) * result.samples)

    metrics = flat_metrics(result, counts, "lowest_entropy")
    assert metrics["trade_off"] == le["trade_off"]
    assert metrics["member.l2.max"] == result.rows["member.l2"]["max"]
    assert metrics["choice.average.l1/gate.linf"] == result.choice["average"]["l1/gate"]["linf"]
    assert metrics["average.linf/confident"] == result.rows["average"]["linf/confident"]
    assert metrics["parameters.saving"] == counts["saving"]

    for figure in (
        accuracy_figure(result.rows, list(NORMS)),
        choice_figure(result.choice, list(NORMS)),
    ):
        png = io.BytesIO()
        figure.savefig(png, format="png")
        assert png.getvalue().startswith(b"\x89PNG")


def test_members_come_from_the_training_run(tmp_path, members, monkeypatch):
    members = locations(members)  # strings, as a training run's tags hold them
    monkeypatch.chdir(tmp_path)
    job = agg_job(tmp_path)
    tracker = Tracker(job)
    with pytest.raises(ValueError, match="no training run of job 'agg'"):
        member_checkpoints(job, tracker)
    partial = training_run(tracker, job, {n: members[n] for n in ("linf", "l2")})
    with pytest.raises(ValueError, match=f"{partial} has no final checkpoint for member.s. l1"):
        member_checkpoints(job, tracker, partial)
    with pytest.raises(ValueError, match="training run 'no-such-run' not found"):
        member_checkpoints(job, tracker, "no-such-run")
    complete = training_run(tracker, job, members)
    assert member_checkpoints(job, tracker, complete) == members


def _nothing_registered(job) -> None:
    client = MlflowClient(job.tracking.resolved_uri())
    assert client.search_registered_models() == []
    experiment = client.get_experiment_by_name(job.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`psat.role` = 'aggregate'")
    assert runs == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("missing_run", "training run 'deadbeef' not found"),
        ("wrong_tensors", "does not match architecture hyper_resnet10"),
        ("other_arch", "has arch='resnet18', but job 'agg' has 'resnet10'"),
        ("not_a_checkpoint", "no member spec"),
    ],
)
def test_bad_members_are_one_error_and_register_nothing(
    bad, message, tmp_path, members, monkeypatch
):
    members = locations(members)  # strings, as a training run's tags hold them
    monkeypatch.chdir(tmp_path)
    job = agg_job(tmp_path)
    given = dict(members)
    if bad == "wrong_tensors":  # member.json says embedding 4, tensors are embedding 8's
        given["l1"] = str(write_member(tmp_path / "bad", "l1", 0, embedding_dim=8))
    elif bad == "other_arch":
        given["l2"] = str(write_member(tmp_path / "r18", "l2", 0, arch="resnet18"))
    elif bad == "not_a_checkpoint":
        given["linf"] = str(tmp_path)
    error = FileNotFoundError if bad == "not_a_checkpoint" else ValueError
    ray_work = _ray_work()
    with pytest.raises(error, match=message):
        if bad == "missing_run":
            aggregate(job, train_run="deadbeef", echo=lambda line: None)
        else:
            aggregate(job, given, echo=lambda line: None)
    # given members are refused before the SQLite store exists; a training run needs the store
    assert (tmp_path / "mlflow.db").exists() == (bad == "missing_run")
    if bad == "missing_run":
        _nothing_registered(job)
    assert _ray_work() == ray_work  # failed before any Ray work


def _ray_work() -> int:
    """How many tasks and actors the Ray of this process has run (0: no Ray)."""
    if not ray.is_initialized():
        return 0
    from ray.util.state import list_actors, list_tasks

    found = {"limit": 10_000, "raise_on_missing_output": False}
    return len(list_tasks(**found)) + len(list_actors(**found))


def test_partial_sweep_is_refused_and_registers_nothing(tmp_path, members):
    """A sweep that covered only l_inf: `psat aggregate --from-sweep` names the missing norms."""
    import json

    import yaml

    members = locations(members)  # strings, as a training run's tags hold them

    job = agg_job(tmp_path, name="partial")
    sweep = tmp_path / "runs" / "partial" / "sweep"
    sweep.mkdir(parents=True)
    (sweep / "best.json").write_text(json.dumps({"linf": {"checkpoint": members["linf"]}}))
    config = tmp_path / "partial.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    proc = psat("aggregate", "--config", str(config), "--from-sweep", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "miss training.members l2, l1" in line and "--allow-partial" in line
    assert not (tmp_path / "mlflow.db").exists()  # refused before the tracking store opened
