"""Careless or hostile input, faults and concurrent jobs, as `psat` meets them in processes of
their own: one clear line and exit 2, or nothing lost (issue 14's probes)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ENV, MlflowServer, RunsCommand, free_port, psat, write_member
from mlflow.tracking import MlflowClient

from orchestrator.config import deep_merge, parse_config
from orchestrator.runtime.locking import job_lock
from orchestrator.runtime.tracking import Tracker

NORMS = ("linf", "l2", "l1")


def job_file(tmp_path: Path, tiny_job, name: str = "probe", **sections) -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(deep_merge(tiny_job(name), sections)))
    return config


def one_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    return line


def runs(uri: str, experiment: str = "test") -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


@pytest.fixture
def sweep_of(tmp_path):
    """A finished-looking sweep of job `name` whose best members are given checkpoints."""

    def make(name: str, members: dict[str, Path]) -> None:
        folder = tmp_path / "runs" / name / "sweep"
        folder.mkdir(parents=True)
        best = {norm: {"checkpoint": str(path)} for norm, path in members.items()}
        (folder / "best.json").write_text(json.dumps(best))

    return make


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("training.lr", ".inf", "field 'training.lr': value inf: Input should be a finite number"),
        ("training.epochs", "true", "field 'training.epochs': value True"),
        ("name", "x" * 300, "field 'name'"),
        ("data.train_size", "100000", "data.train_size 100000 + data.val_size 32 exceed"),
        ("resources.workers_per_member", "64", "one model needs 64 CPUs at once"),
    ],
)
def test_bad_values_are_one_line_before_any_work(tmp_path, tiny_job, field, value, message):
    config = job_file(tmp_path, tiny_job)
    proc = psat("train", "--config", str(config), "--set", f"{field}={value}", cwd=tmp_path)
    assert message in one_line(proc)
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"probe.yaml", "runs/probe/job.lock"}  # no data, no MLflow, no Ray


REFUSED_UNLOADED = """
import sys
from orchestrator.cli import main
code = main(sys.argv[1:])
print(" ".join(m for m in ("torch", "ray", "mlflow") if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["training.lr=.inf"], "field 'training.lr'"),
        (["tracking.uri=http://127.0.0.1:PORT"], "cannot reach the MLflow tracking server"),
        (["resources.address=127.0.0.1:PORT"], "cannot reach the Ray cluster"),
    ],
    ids=["value", "tracking", "ray"],
)
def test_what_needs_no_library_is_refused_before_torch_ray_and_mlflow_load(
    tmp_path, tiny_job, sets, message
):
    """Bad values and services that do not answer: one line in a fraction of a second, before
    the libraries load (seconds) and before the job's lock or anything else is written."""
    config = job_file(tmp_path, tiny_job)
    sets = [a for s in sets for a in ("--set", s.replace("PORT", str(free_port())))]
    proc = subprocess.run([sys.executable, "-c", REFUSED_UNLOADED, "train", "--config",
                           str(config), *sets], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert message in one_line(proc)
    assert proc.stdout.strip() == ""  # none of them loaded
    assert [p.name for p in tmp_path.iterdir()] == ["probe.yaml"]


def test_storage_path_that_is_a_file_is_one_line(tmp_path, tiny_job):
    config = job_file(tmp_path, tiny_job)
    (tmp_path / "runs").write_text("not a folder")
    line = one_line(psat("train", "--config", str(config), cwd=tmp_path))
    assert "storage.path" in line and "is a file; expected a folder" in line


@pytest.mark.parametrize("damage", ["truncated", "not_weights"])
@pytest.mark.usefixtures("tracking_store")
def test_bad_checkpoints_are_one_line_and_register_nothing(tmp_path, tiny_job, sweep_of, damage):
    members = {n: write_member(tmp_path / "ckpt" / n, n, i) for i, n in enumerate(NORMS)}
    state = members["l2"] / "state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:300])
    else:  # what weights_only refuses: pickled objects, here one that would run a command
        marker = tmp_path / "ran"
        torch.save({"model": RunsCommand(f"touch {marker}")}, state)
    sweep_of("probe", members)
    config = job_file(tmp_path, tiny_job)
    line = one_line(psat("aggregate", "--config", str(config), "--from-sweep", cwd=tmp_path))
    assert str(state) in line
    if damage == "not_weights":
        assert "objects other than tensors" in line and not marker.exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert MlflowClient(uri).search_registered_models() == []


def test_second_job_with_a_running_name_is_refused(tmp_path, tiny_job):
    config = job_file(tmp_path, tiny_job)
    job = parse_config(tiny_job("probe"))
    with job_lock(job, "train"):  # this process is the first job
        line = one_line(psat("train", "--config", str(config), cwd=tmp_path))
        assert "job 'probe' is running: `psat train` (pid" in line
        assert f"pid {os.getpid()}" in line and "choose another name" in line
        line = one_line(psat("aggregate", "--config", str(config), cwd=tmp_path))
        assert "job 'probe' is running" in line
    # a holder that dies (SIGKILL) leaves no stale lock behind
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from orchestrator.config import load_config
            from orchestrator.runtime.locking import job_lock
            with job_lock(load_config({str(config)!r}), "train"):
                print("held", flush=True)
                time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match="is running"), job_lock(job, "train"):
        pass
    holder.kill()
    holder.wait()
    with job_lock(job, "train"):
        pass


FRESH_STORE = textwrap.dedent(
    """
    import sys
    from orchestrator.config import parse_config
    from orchestrator.runtime.tracking import Tracker
    print("ready", flush=True)
    sys.stdin.readline()  # all three go at once, MLflow imported
    tracking = {"uri": sys.argv[1], "experiment": "e"}
    job = parse_config({"name": "s" + sys.argv[2], "tracking": tracking})
    with Tracker(job).job_run("train"):
        pass
    """
)


def test_jobs_that_start_together_on_a_fresh_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FRESH_STORE, uri, str(i)],
            env=ENV,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(3)
    ]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 3
    for p in procs:  # the barrier: released within microseconds of each other
        p.stdin.write("\n")
        p.stdin.flush()
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert len(runs(uri, "e")) == 3


KILLED_AFTER_REGISTER = textwrap.dedent(
    """
    import os, signal, sys
    import mlflow
    from orchestrator.aggregate import aggregate
    from orchestrator.config import load_config

    if sys.argv[2] == "kill":  # fault injection: die right after the version is created
        register = mlflow.register_model
        def register_then_die(*args, **kwargs):
            register(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        mlflow.register_model = register_then_die
    aggregate(load_config(sys.argv[1]), dict(zip(("linf", "l2", "l1"), sys.argv[3:])))
    """
)


@pytest.mark.slow
@pytest.mark.usefixtures("tracking_store")
def test_aggregation_killed_after_registering_is_completed_not_repeated(
    tmp_path, tiny_job, ray_address
):
    members = [str(write_member(tmp_path / "ckpt" / n, n, i)) for i, n in enumerate(NORMS)]
    config = job_file(tmp_path, tiny_job, resources={"address": ray_address},
                      registry={"model_name": "psat-killed"},
                      evaluation={"suite": "paper"})  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for mode in ("kill", "relaunch"):
        proc = subprocess.run(
            [sys.executable, "-c", KILLED_AFTER_REGISTER, str(config), mode, *members],
            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if mode == "kill":
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            client = MlflowClient(uri)
            (version,) = client.search_model_versions("name = 'psat-killed'")
            assert client.get_registered_model("psat-killed").aliases == {}
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "resuming aggregate run" in proc.stdout
    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name = 'psat-killed'")  # still one version
    assert client.get_registered_model("psat-killed").aliases == {"candidate": 1, "champion": 1}
    (run,) = [r for r in runs(uri) if r.data.tags["psat.role"] == "aggregate"]
    assert run.info.status == "FINISHED" and run.data.tags["psat.registered_version"] == "1"


@pytest.mark.slow
@pytest.mark.usefixtures("tracking_store")
def test_sigterm_marks_the_jobs_runs_killed(tmp_path, tiny_job, ray_address):
    config = job_file(tmp_path, tiny_job, training={"epochs": 50, "members": ["linf", "l1"]},
                      resources={"address": ray_address})  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "train", "--config", str(config)],
        cwd=tmp_path, env=ENV | {"PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "epoch 1/50" in line:  # members are training, their runs RUNNING
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    proc.wait(timeout=60)  # SIGTERM stops the job in seconds, never after its trainers
    assert proc.returncode == 143, "".join(seen) + rest  # the shells' 128 + 15
    assert rest.splitlines()[-1] == (
        "psat train: interrupted by SIGTERM; its MLflow runs are marked KILLED; resume it "
        f"with: psat train --config {config}"
    )
    statuses = {r.data.tags["psat.role"] + r.data.tags.get("psat.plan", ""): r.info.status
                for r in runs(uri)}  # fmt: skip
    assert statuses == {"train": "KILLED", "modellinf": "KILLED", "modell1": "KILLED"}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left in the session


@pytest.mark.slow
def test_a_tracking_server_gone_mid_job_ends_it_in_one_line_with_no_run_left_running(
    tmp_path, tiny_job, ray_address
):
    server = MlflowServer(Path(sys.executable).parent, tmp_path / "server").start()
    config = job_file(tmp_path, tiny_job, training={"epochs": 500, "members": ["linf"]},
                      tracking={"uri": server.uri}, resources={"address": ray_address})  # fmt: skip
    quick = {"PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}  # no 2+4 s waits
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "train", "--config", str(config)],
        cwd=tmp_path, env=ENV | quick, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "epoch 1/500" in line:  # training, its runs RUNNING
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait()
            if "stopped answering" in line:  # the job waits for the server to end its runs
                server.start(port=server.port)  # the same store, at the same address
                back = time.monotonic()
                break
        seen.append(proc.communicate(timeout=120)[0])
        assert time.monotonic() - back < 30  # its trainers stopped: 500 epochs are minutes
        output = "".join(seen)
        assert proc.returncode == 2 and "Traceback" not in output, output[-3000:]
        last = output.strip().splitlines()[-1]
        assert last.startswith(f"psat train: error: the MLflow tracking server {server.uri} "
                               "stopped answering during the job"), output[-3000:]  # fmt: skip
        assert "runs are marked FAILED" in last
        statuses = {r.data.tags["psat.role"]: r.info.status for r in runs(server.uri)}
        assert statuses == {"train": "FAILED", "model": "FAILED"}
    finally:
        server.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)  # "billion laughs": 9^10 strings once expanded
PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB, of the psat process
sys.exit(done.returncode)
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BOMB + "name: bomb\n", "uses the YAML alias *a0 at line 2; psat configs take no anchors"),
        ("# padding\n" * 120_000, "has 1,200,000 bytes; a psat config has at most 1,048,576"),
    ],
    ids=["alias-bomb", "oversize"],
)
def test_hostile_yaml_is_one_line_fast_and_small(tmp_path, text, message):
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    command = [sys.executable, "-m", "orchestrator.cli", "train", "--config", str(config)]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    seconds, peak_kib = time.monotonic() - start, int(proc.stdout)
    assert message in one_line(proc)
    # the file is read before torch, Ray and MLflow load (1 GB, 3 s); the bomb once took 8.6 GB
    assert seconds < 2 and peak_kib < 1 << 20, (seconds, peak_kib)
    assert [p.name for p in tmp_path.iterdir()] == ["hostile.yaml"]


@pytest.mark.usefixtures("tracking_store")
def test_a_changed_config_is_refused_before_ray_starts(tmp_path, tiny_job):
    with Tracker(parse_config(tiny_job("probe"))).job_run("train"):
        pass  # the job ran before, with 2 epochs
    config = job_file(tmp_path, tiny_job, training={"epochs": 3})
    ray_temp = tmp_path / "ray"  # where a Ray started by the job would keep its session
    proc = psat("train", "--config", str(config), cwd=tmp_path,
                env=ENV | {"RAY_TMPDIR": str(ray_temp)})  # fmt: skip
    line = one_line(proc)
    assert "job 'probe' already ran with a different config (training.epochs: '2' -> '3')" in line
    assert not ray_temp.exists() and not (tmp_path / "runs" / "probe" / "data").exists()


@pytest.mark.parametrize("command", ["pull", "train", "evaluate", "submit"])
def test_an_unreachable_tracking_server_is_one_line(tmp_path, tiny_job, command):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = ["--config", str(job_file(tmp_path, tiny_job)), "--set", f"tracking.uri={uri}"]
    args = {
        "pull": ["pull", "models:/psat-x@champion", "--tracking-uri", uri],
        "train": ["train", *config],
        "evaluate": ["evaluate", *config, "--model", "models:/psat-x@champion"],
        "submit": ["submit", "train", *config, "--address", f"http://127.0.0.1:{free_port()}"],
    }[command]
    start = time.monotonic()
    line = one_line(psat(*args, cwd=tmp_path, env=ENV | {"HOME": str(tmp_path)}))
    assert time.monotonic() - start < 15
    assert f"cannot reach the MLflow tracking server {uri} (" in line


@pytest.mark.parametrize(("command", "status"), [("pull", 401), ("train", 403)])
def test_a_server_behind_an_auth_proxy_is_reached_and_its_refusal_is_one_line(
    tmp_path, tiny_job, command, status
):
    """An auth proxy answers every request, /health included, with 401 or 403: the server is
    reachable; the first request it refuses is one line about credentials, before Ray starts."""

    class Proxy(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            body = b"<html><body>Authentication required</body></html>"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy) as proxy:
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{proxy.server_address[1]}"
        config = ["--config", str(job_file(tmp_path, tiny_job)), "--set", f"tracking.uri={uri}"]
        args = {
            "pull": ["pull", "models:/psat-x@champion", "--tracking-uri", uri],
            "train": ["train", *config],
        }[command]
        ray_temp = tmp_path / "ray"
        env = ENV | {"HOME": str(tmp_path), "RAY_TMPDIR": str(ray_temp)}
        proc = psat(*args, cwd=tmp_path, env=env)
        proxy.shutdown()
    assert one_line(proc) == (
        f"psat {command}: error: the MLflow tracking server {uri} refused this request's "
        f"credentials (HTTP {status}); set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD, to credentials it accepts"
    )
    assert not ray_temp.exists() and not (tmp_path / "runs" / "probe" / "data").exists()


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"]
)
def test_sigterm_stops_a_pull_waiting_on_a_silent_server(tmp_path, signum, status):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "pull", "models:/x@champion",
             "--tracking-uri", uri], cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True,
            # Ctrl-C as at a terminal, whatever this process inherited (a shell's background
            # job ignores SIGINT, and so would its children)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        silent.settimeout(60)
        waiting, _ = silent.accept()  # pull has asked and waits for an answer
        proc.send_signal(signum)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - start < 5
        waiting.close()
    assert proc.returncode == status, err  # the shells' 128 + the signal's number
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == f"psat pull: interrupted by {name}"


def test_an_unreachable_ray_address_is_one_line_before_any_work(tmp_path, tiny_job):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = job_file(tmp_path, tiny_job, resources={"address": address})
    start = time.monotonic()
    line = one_line(psat("train", "--config", str(config), cwd=tmp_path))
    assert time.monotonic() - start < 15
    assert f"cannot reach the Ray cluster at {address} (Connection refused)" in line
    assert [p.name for p in tmp_path.iterdir()] == ["probe.yaml"]  # refused before the lock
