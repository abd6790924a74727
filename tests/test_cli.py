"""The psat command line as a user meets it (the quickstart end to end: e2e/test_jobs.py)."""

import pickle
import re
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import RunsCommand, psat, write_cifar10

from orchestrator.cli import build_parser, main


@pytest.mark.parametrize("command", ["run", "train", "sweep", "aggregate", "evaluate", "reproduce"])
def test_missing_config_is_one_line_and_writes_nothing(
    tmp_path, command, monkeypatch, capsys, shared_ray
):
    monkeypatch.chdir(tmp_path)  # main() as `psat` runs it; the malformed file's test runs psat
    extra = ["--model", "models:/x@champion"] if command == "evaluate" else []
    assert main([command, "--config", "nope.yaml", *extra]) == 2
    assert shared_ray.is_initialized()  # a failed command leaves a Ray it did not start
    err = capsys.readouterr().err
    line = f"psat {command}: error: config file nope.yaml does not exist; the example configs"
    assert err.startswith(line) and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_malformed_yaml_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\ntraining: {epochs: 3\n")
    proc = psat("run", "--config", "bad.yaml", cwd=tmp_path, timeout=600)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml: not valid YAML" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


JOB = ["--config", "--set"]
# what each command takes, as the README documents it
OPTIONS = {
    "train": JOB,
    "sweep": JOB,
    "run": JOB,
    "reproduce": JOB,
    "aggregate": [*JOB, "--from-sweep", "--train-run", "--force-champion", "--allow-partial"],
    "evaluate": [*JOB, "--model"],
    "pull": ["uri", "--dst", "--tracking-uri"],
    "serve": ["uri", "--host", "--port", "--dst", "--tracking-uri", "--max-body-mb", "--max-rows"],
    "submit": ["JOB"],
    "params": ["--arch", "--num-classes", "--embedding-dim", "--members", "--in-channels"],
}
SUBMITTED = ["train", "sweep", "run", "reproduce", "aggregate"]


def help_of(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main([*args, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def options_in(text: str) -> list[str]:
    """The options and positionals a help text lists, in order."""
    listed = re.findall(r"^  (?:-\w, )?(--?[\w-]+|[\w]+)", text, flags=re.MULTILINE)
    return [name for name in listed if name not in ("-h", "--help")]


def test_psat_help_lists_every_command_and_the_verbose_flag(capsys):
    out = help_of([], capsys)
    assert out.startswith("usage: psat [-h] [-v] COMMAND ...")
    commands = re.findall(r"^    (\w+)\s", out, flags=re.MULTILINE)
    assert sorted(commands) == sorted(OPTIONS)
    assert "-v, --verbose" in out


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_command_lists_the_options_it_takes(command, capsys):
    out = help_of([command], capsys)
    assert out.startswith(f"usage: psat {command}")
    listed = options_in(out)
    if command == "submit":
        listed = listed[:1]  # then the jobs it submits
    assert listed == OPTIONS[command]


@pytest.mark.parametrize("job", SUBMITTED)
def test_submit_takes_each_jobs_options_and_the_clusters(job, capsys):
    out = help_of(["submit", job], capsys)
    cluster = ["--address", "--token", "--env", "--no-follow"]
    assert options_in(out) == [*OPTIONS[job], *cluster]


def test_params_prints_table2_row(tmp_path):
    proc = psat("params", "--arch", "resnet18", "--num-classes", "200", "--embedding-dim", "64",
                cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0
    assert "1,318,104" in proc.stdout and "88.31%" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "forwarded"),
    [
        (["aggregate", "--from-sweep", "--force-champion"], ["--from-sweep", "--force-champion"]),
        (["aggregate", "--train-run", "abc123", "--allow-partial"],
         ["--train-run", "abc123", "--allow-partial"]),
        (["aggregate"], []),
        (["train"], []),
    ],
)  # fmt: skip
def test_submit_forwards_every_job_option(argv, forwarded):
    """`psat submit JOB` parses the job's own options and hands them on unchanged."""
    from orchestrator.cli import JOBS, job_arguments

    job, *options = argv
    args = build_parser().parse_args(
        ["submit", job, "--config", "c.yaml", "--set", "a.b=1", *options, "--address", "http://h"]
    )
    assert job_arguments(args, JOBS[job].options) == forwarded
    local = build_parser().parse_args([job, "--config", "c.yaml", *forwarded])
    assert job_arguments(local, JOBS[job].options) == forwarded  # the same words locally


def _options(*path: str) -> set[str]:
    """The option strings of `psat PATH...` (e.g. ("submit", "aggregate"))."""
    import argparse

    parser = build_parser()
    for name in path:
        (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = commands.choices[name]
    return {option for action in parser._actions for option in action.option_strings}


def test_submit_takes_what_each_job_takes():
    """Every option of `psat JOB` is an option of `psat submit JOB`, plus the cluster's."""
    for job in ("train", "sweep", "aggregate", "run", "reproduce"):
        local, remote = _options(job), _options("submit", job)
        assert local <= remote, (job, local - remote)
        assert remote - local == {"--address", "--token", "--env", "--no-follow"}
    assert {"--from-sweep", "--train-run", "--force-champion", "--allow-partial"} <= _options(
        "submit", "aggregate"
    )


@pytest.mark.parametrize(
    ("sets", "refusal"),
    [
        ([], "data_batch_1: not a CIFAR-10 python batch (UnpicklingError: refusing global"),
        (["--set", "resources.workers_per_member=64"], "one model needs 64 CPUs at once"),
    ],
    ids=["poisoned-dataset", "oversize-request"],
)
def test_refused_before_anything_starts_or_is_written(tmp_path, sets, refusal):
    """A dataset file that is code, or a model larger than this machine: one line in under
    2 s, before Ray starts (no session directory) and before anything is written here."""
    data = tmp_path / "data"
    data.mkdir()
    write_cifar10(data)
    marker = tmp_path / "ran"
    batch = data / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": RunsCommand(f"touch {marker}"), "labels": [0]}))
    work = tmp_path / "work"
    work.mkdir()
    config = work / "job.yaml"
    config.write_text(yaml.safe_dump({"name": "refused", "data": {"dataset": "cifar10",
                                      "data_dir": str(data)}}))  # fmt: skip
    sessions = set(Path(tempfile.gettempdir(), "ray").glob("session_*"))
    started = time.monotonic()
    proc = psat("train", "--config", str(config), *sets, cwd=work)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert refusal in line and elapsed < 2, (line, elapsed)
    assert list(work.iterdir()) == [config] and not marker.exists()
    assert set(Path(tempfile.gettempdir(), "ray").glob("session_*")) == sessions
