"""Ray Tune sweeps on a real local Ray, tiny data."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import ROOT, ray_actors
from mlflow.tracking import MlflowClient

from orchestrator.config import ConfigError, parse_config
from orchestrator.training.tune import check_space, trial_job
from psat_core.checkpoint import load_state, read_spec


@pytest.mark.slow
@pytest.mark.usefixtures("tracking_store")
def test_an_interrupted_sweep_continues_and_writes_table_best_configs_plot_and_runs(
    tmp_path, tiny_job, shared_ray, ray_address
):
    """`python -m jobs.sweep`, Ctrl-C after its first trial, run again: the finished trial is
    not rerun, and the sweep's table, best members, plot and nested MLflow runs are whole."""
    space = {"embedding_dim": [8], "norm": ["linf", "l2"]}  # the job's own embedding_dim is 4
    # ASHA's max_t of 1 epoch is below the 2 configured epochs: every trial is stopped by ASHA,
    # two at a time, one of them interrupted and resumed by the second launch
    config = tiny_job(
        "sweep",
        training={"epochs": 2},
        sweep={"space": space, "max_t": 1, "max_concurrent_trials": 2},
        resources={"address": ray_address},  # the session's Ray: no start-up per process
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "jobs.sweep", "--config", str(path)]
    before = ray_actors(shared_ray)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    # Ctrl-C reaches it, even where this process ignores SIGINT (a shell's background job)
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    ended = re.compile(
        r"^trial (\d) \((\w+)\) ended after 1/1 epochs: objective [\d.]+, trade_off "
    )
    finished, lines = [], []
    deadline = time.time() + 400
    for line in first.stdout:
        lines.append(line)
        if match := ended.match(line):
            finished.append(match[2])
            first.send_signal(signal.SIGINT)  # a user's Ctrl-C after the first trial
            break
        assert time.time() < deadline, lines
    first.communicate(timeout=300)
    assert len(finished) == 1, lines
    started = [line for line in lines if " started: embedding_dim=8, norm=" in line]
    assert started and lines[0].startswith("trial 1 ("), lines  # psat's lines, nothing before

    second = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    shown = second.stdout.splitlines()
    assert shown[0].startswith("continuing the sweep"), shown
    resumed = [line for line in shown if " started: " in line]
    assert resumed and not any(finished[0] in line for line in resumed), shown
    assert len([line for line in shown if ended.match(line)]) == len(resumed), shown
    # only psat's lines: no Tune status tables, trial boxes, hints or log records
    noise = ("╭", "tensorboard", "View detailed", " INFO ", "WARNING")
    printed = second.stdout + second.stderr
    assert not [word for word in noise if word in printed], printed
    header = next(line for line in shown if line.split()[:3] == ["trial", "norm", "embedding_dim"])
    assert shown[shown.index(header) + 1 :][-2:] == [
        line for line in shown if line.startswith("best ")
    ]  # fmt: skip

    job = parse_config(config)
    out = Path(job.storage.path, "sweep", "sweep")
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert {(r["config.embedding_dim"], r["norm"]) for r in table} == {("8", "linf"), ("8", "l2")}
    assert len(table) == 2 and all(r["epochs_run"] < 2 for r in table)
    # no trial trained past max_t, however it was stopped and resumed
    trained = [load_state(c)["epoch"] for c in out.parent.glob("trial-*/checkpoint_*/")]
    assert trained and set(trained) == {0}, trained
    assert all(r["member_params"] > 0 and 0 <= r["trade_off"] <= 1 for r in table)
    best = json.loads((out / "best.json").read_text())
    assert set(best) == {"linf", "l2"}
    for norm, row in best.items():
        assert row["metrics"]["objective"] == max(
            r["objective"] for r in table if r["norm"] == norm
        )
        assert read_spec(row["checkpoint"]).embedding_dim == 8  # the trial's, not the job's
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(job.tracking.uri)
    experiment = client.get_experiment_by_name(job.tracking.experiment).experiment_id
    (parent,) = client.search_runs([experiment], "tags.`psat.role` = 'sweep'")
    trials = client.search_runs([experiment], "tags.`psat.role` = 'trial'")
    assert len(trials) == 2
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.parquet", "best.json", "tradeoff.png"} <= artifacts
    # ASHA stops trials: their runs keep Ray Train's placement group cleaner (ShardTrainer)
    actors = [a for key, a in ray_actors(shared_ray).items() if key not in before]
    assert sum(a.class_name == "PlacementGroupCleaner" for a in actors) >= len(trials)


def test_unknown_sweep_parameter_is_one_clear_error():
    with pytest.raises(ConfigError, match="sweep.space.*unknown sweep parameter 'depth'"):
        parse_config({"name": "x", "sweep": {"space": {"depth": [1, 2]}}})
    with pytest.raises(ConfigError, match="takes a list"):
        parse_config({"name": "x", "sweep": {"space": {"norm": {"low": 1, "high": 2}}}})
    job = parse_config({"name": "x", "sweep": {"space": {"steps": [3, 0]}}})
    with pytest.raises(ConfigError, match="sweep.space.steps: value 0"):
        check_space(job)
    job = parse_config({"name": "x", "sweep": {"space": {"optimizer": ["adam", "lion"]}}})
    with pytest.raises(ConfigError, match="sweep.space.optimizer: value 'lion'"):
        check_space(job)


def test_a_trial_sets_the_optimizer_and_its_group_multipliers():
    job = parse_config({"name": "x", "training": {"lr": 0.01, "optimizer": {"name": "sgd"}}})
    params = {"norm": "l2", "optimizer": "adam", "generator_lr": 0.3, "embeddings_lr": 4.0}
    trial, plan = trial_job(job, params)
    optimizer = trial.training.optimizer
    assert (optimizer.name, optimizer.generator.lr, optimizer.embeddings.lr) == ("adam", 0.3, 4.0)
    assert optimizer.rest.lr == 1.0 and trial.training.lr == 0.01 and plan.norms == ("l2",)
