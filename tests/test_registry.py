"""orchestrator.registry against real MLflow: an SQLite store and a `mlflow server` process.

Members are tiny random hypernetwork ResNets written with `save_member` (the training job's
checkpoint format), once per session (conftest's `members`); every process these tests start
listens on 127.0.0.1 and is stopped by its own process group id.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import free_port, make_venv, wait_http, write_member
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.registry.pull import load_ensemble, pull, resolve
from orchestrator.registry.register import CANDIDATE, CHAMPION, register_ensemble
from orchestrator.runtime.tracking import PARTIAL_TAG, TRADE_OFF_TAG, tracking
from psat_core.checkpoint import checkpoint_digest, ensemble_from_checkpoints, export_weights
from psat_core.data import load_dataset
from psat_core.ensemble import PSATEnsemble

NORMS = ("linf", "l2", "l1")
BIN = Path(sys.executable).parent
# what psat requires beyond MLflow and PyTorch (and what they bring): absent where it serves
PSAT_ONLY = ("safetensors", "ray", "torchvision", "torchattacks", "foolbox")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_dataset("digits", "test", "unused").to_float()[:6]


def start(args: list[str], log: Path, env: dict | None = None, bin: Path = BIN) -> subprocess.Popen:
    """A process in its own session, so that stop() ends it and its workers by group id; its
    commands from `bin` first."""
    env = {**os.environ, **(env or {}), "PATH": f"{bin}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def plain_bin(tmp_path_factory) -> Path:
    """The bin/ of a venv with MLflow, PyTorch and their dependencies but no psat, nor what
    psat alone requires: a serving host's or a teammate's notebook's (the registered model
    brings its own code)."""
    return make_venv(tmp_path_factory.mktemp("plain") / "venv", with_psat=False, hide=PSAT_ONLY)


@pytest.fixture
def server(mlflow_server) -> str:
    """The session's `mlflow server` (SQLite backend, proxied artifacts): its HTTP URI."""
    return mlflow_server


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path, monkeypatch):
    """A tracking URI (SQLite file or the server), the default for this test and its children."""
    monkeypatch.chdir(tmp_path)
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def new_run(uri: str, tmp_path: Path) -> str:
    client = MlflowClient(uri)
    name = f"registry-{tmp_path.name}"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None if uri.startswith("http") else (tmp_path / "artifacts").as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    return client.create_run(experiment_id, tags={"psat.role": "aggregate"}).info.run_id


def model_name(request) -> str:
    return "psat-" + "".join(c if c.isalnum() else "-" for c in request.node.name)


def register(uri, tmp_path, members, name, trade_off, force=False, partial=False):
    return register_ensemble(
        members,
        model_name=name,
        run_id=new_run(uri, tmp_path),
        trade_off=trade_off,
        force_champion=force,
        partial=partial,
        tracking_uri=uri,
    )


def aliases(uri: str, name: str) -> dict[str, int]:
    return {a: int(v) for a, v in MlflowClient(uri).get_registered_model(name).aliases.items()}


@pytest.mark.slow
def test_versions_and_aliases(store, tmp_path, members, request):
    name = model_name(request)
    client = MlflowClient(store)
    first = register(store, tmp_path, members, name, 0.30)
    assert (first.version, first.champion, first.previous_champion) == (1, True, None)
    assert aliases(store, name) == {CANDIDATE: 1, CHAMPION: 1}
    source = client.get_model_version(name, "1").source

    worse = register(store, tmp_path, members, name, 0.20)
    assert (worse.version, worse.champion, worse.previous_champion) == (2, False, 1)
    assert aliases(store, name) == {CANDIDATE: 2, CHAMPION: 1}

    better = register(store, tmp_path, members, name, 0.40)
    assert (better.version, better.champion) == (3, True)
    assert aliases(store, name) == {CANDIDATE: 3, CHAMPION: 3}

    forced = register(store, tmp_path, members, name, 0.10, force=True)
    assert (forced.version, forced.champion, forced.previous_champion) == (4, True, 3)
    assert aliases(store, name) == {CANDIDATE: 4, CHAMPION: 4}

    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]  # nothing overwritten
    assert client.get_model_version(name, "1").source == source
    assert float(client.get_model_version(name, "2").tags[TRADE_OFF_TAG]) == 0.20
    assert int(resolve(f"models:/{name}@{CHAMPION}").version) == 4


def test_partial_ensemble_takes_champion_only_when_forced(tmp_path, members, request):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = model_name(request)
    linf = {"linf": members["linf"]}
    first = register(uri, tmp_path, linf, name, 0.9, partial=True)
    assert (first.version, first.champion) == (1, False)
    assert aliases(uri, name) == {CANDIDATE: 1}  # not even the first version's champion
    assert "no champion yet" in first.lines()[0]
    full = register(uri, tmp_path, members, name, 0.3)
    assert full.champion and aliases(uri, name) == {CANDIDATE: 2, CHAMPION: 2}
    better = register(uri, tmp_path, linf, name, 0.9, partial=True)  # a better trade-off
    assert not better.champion and aliases(uri, name) == {CANDIDATE: 3, CHAMPION: 2}
    forced = register(uri, tmp_path, linf, name, 0.1, force=True, partial=True)
    assert forced.champion and aliases(uri, name) == {CANDIDATE: 4, CHAMPION: 4}
    tags = MlflowClient(uri).get_model_version(name, "1").tags
    assert tags[PARTIAL_TAG] == "true"
    assert MlflowClient(uri).get_model_version(name, "2").tags[PARTIAL_TAG] == "false"


PLAIN = textwrap.dedent(
    """
    import importlib.util, sys, mlflow, numpy as np, torch
    for name in ("psat_core", "safetensors", "ray"):  # only MLflow and PyTorch here
        assert importlib.util.find_spec(name) is None, f"this process can import {name}"
    torch.set_num_threads(int(sys.argv[3]))
    pyfunc = mlflow.pyfunc.load_model(sys.argv[1]).predict(np.load(sys.argv[2]))
    assert "/code/psat_core/" in sys.modules["psat_core"].__file__  # the version's own code
    pyfunc.to_pickle(sys.argv[4] + "/pyfunc.pkl")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite"], indirect=True)  # the server: the served test
def test_a_plain_mlflow_client_loads_it_bit_for_bit(
    store, tmp_path, members, images, plain_bin, request
):
    """In a process that cannot import psat, `mlflow.pyfunc.load_model` runs the version's own
    code and answers as psat's `load_ensemble` does, bit for bit."""
    name = model_name(request)
    register(store, tmp_path, members, name, 0.5)
    expected = pd.DataFrame(ensemble_from_checkpoints(members).predict(images))
    assert expected["member"].isin(NORMS).all() and expected["probability"].between(0, 1).all()
    np.save(tmp_path / "x.npy", images.numpy())
    uri = f"models:/{name}@{CHAMPION}"
    args = [uri, str(tmp_path / "x.npy"), str(torch.get_num_threads()), str(tmp_path)]
    python = plain_bin / "python"
    subprocess.run([str(python), "-c", PLAIN, *args], check=True, timeout=300, cwd=tmp_path)
    direct = pd.DataFrame(load_ensemble(uri).predict(images))  # psat's own load, here
    for answers in (pd.read_pickle(tmp_path / "pyfunc.pkl"), direct):
        pd.testing.assert_frame_equal(answers, expected, check_exact=True)
    stored = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    requirements = (stored / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in requirements] == ["torch", "numpy", "pandas", "mlflow"]
    assert not list(stored.rglob("*.pt")) and not list(stored.rglob("*.pkl"))  # no pickle
    assert sorted(p.name for p in (stored / "artifacts" / "member_l2").iterdir()) == [
        "member.json", "weights.safetensors"
    ]  # fmt: skip
    # a container image of it installs public packages only
    subprocess.run(
        [str(plain_bin / "mlflow"), "models", "generate-dockerfile", "-m", uri,
         "-d", str(tmp_path / "docker")], check=True, capture_output=True, timeout=120,
        cwd=tmp_path, env=os.environ | {"MLFLOW_TRACKING_URI": store},
    )  # fmt: skip
    dockerfile = (tmp_path / "docker" / "Dockerfile").read_text()
    assert "RUN pip install mlflow==" in dockerfile and "_install_pyfunc_deps" in dockerfile
    shipped = tmp_path / "docker" / "model_dir" / "requirements.txt"
    assert shipped.read_text().split() == requirements


@pytest.mark.slow
def test_pull_downloads_verifies_and_describes(store, tmp_path, members, request):
    name = model_name(request)
    register(store, tmp_path, members, name, 0.25)
    lines: list[str] = []
    pulled = pull(f"models:/{name}@{CHAMPION}", dst=tmp_path / "pulled", echo=lines.append)
    assert (pulled.name, pulled.version, pulled.aliases) == (name, 1, (CANDIDATE, CHAMPION))
    assert isinstance(pulled.ensemble, PSATEnsemble) and pulled.ensemble.names == NORMS
    assert pulled.trade_off == 0.25 and pulled.strategy == "lowest_entropy"
    assert pulled.parameters == 3 * pulled.member_parameters["linf"] < pulled.plain_parameters
    assert (tmp_path / "pulled" / "MLmodel").is_file()
    text = "\n".join(lines)
    assert f"{name} version 1" in text and "members: linf, l2, l1; digits" in text
    for norm in NORMS:  # each member's own description, from its verified files
        count = pulled.member_parameters[norm]
        described = f"norm {norm}, method at, hyper_resnet10, embedding 4"
        assert f"  {norm}: {described}; {count:,} parameters" in lines
        tags = MlflowClient().get_model_version(name, "1").tags
        assert tags[f"psat.member.{norm}"] == described
    assert "input 1x8x8" in text and "verified" in text

    # a damaged member is refused on load
    state = tmp_path / "pulled" / "artifacts" / "member_l2" / "weights.safetensors"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(Exception, match="does not match the digest"):
        mlflow.pyfunc.load_model(str(tmp_path / "pulled"))


def test_pull_refuses_tampering_the_artifact_store_can_hide(tmp_path, members, monkeypatch):
    """Weights replaced and MLmodel's digest rewritten to match: the registry's digest tags
    still refuse them, before the stored psat_model.py runs."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register(uri, tmp_path, members, "psat-tamper", 0.5)
    (stored,) = (tmp_path / "artifacts").rglob("MLmodel")  # the store's copy of the model
    other = write_member(tmp_path / "other", "l2", 99)
    target = stored.parent / "artifacts" / "member_l2"
    export_weights(other, target)
    text = stored.read_text()
    recorded = MlflowClient(uri).get_model_version("psat-tamper", "1").tags["psat.sha256.l2"]
    stored.write_text(text.replace(recorded, checkpoint_digest(target)))
    marker = tmp_path / "code-ran"
    code = stored.parent / "psat_model.py"
    code.write_text(f"open({str(marker)!r}, 'w').close()\n" + code.read_text())
    with pytest.raises(ValueError, match="member 'l2' .* does not match the sha256 the registry"):
        pull("models:/psat-tamper/1", dst=tmp_path / "pulled", tracking_uri=uri)
    assert not marker.exists()  # the stored code never ran


def test_pull_never_creates_a_tracking_store(tmp_path):
    missing = tmp_path / "nope" / "mlflow.db"
    with pytest.raises(ValueError, match="no MLflow store at"):
        pull("models:/x@champion", dst=tmp_path / "x", tracking_uri=f"sqlite:///{missing}")
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_alias_or_version_is_one_clear_error(tmp_path, members, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register(uri, tmp_path, members, "psat-known", 0.5)
    for bad, message in [
        (
            "models:/psat-known@nope",
            r"no alias 'nope' \(aliases: candidate -> v1, champion -> v1\)",
        ),
        ("models:/psat-unknown@champion", "no registered model 'psat-unknown'"),
        ("models:/psat-known/7", "has no version 7"),
    ]:
        with pytest.raises(ValueError, match=message):
            pull(bad, dst=tmp_path / "x", tracking_uri=uri)
        with pytest.raises(ValueError, match=message):
            load_ensemble(bad, tracking_uri=uri)
    with pytest.raises(ValueError, match="expected models:/<name>@<alias>"):
        pull("psat-known@champion", dst=tmp_path / "x", tracking_uri=uri)
    with pytest.raises(ValueError, match="cannot load a psat ensemble from 'psat-known@champion'"):
        load_ensemble("psat-known@champion", tracking_uri=uri)  # any pyfunc URI, e.g. a path
    assert not (tmp_path / "x").exists()


def test_wrong_architecture_registers_nothing(tmp_path, members, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # member.json says embedding_dim 4, the tensors are those of embedding_dim 8
    bad = dict(members, l1=write_member(tmp_path / "bad", "l1", 0, embedding_dim=8))
    run_id = new_run(uri, tmp_path)
    with pytest.raises(ValueError, match="does not match architecture hyper_resnet10"):
        register_ensemble(
            bad, model_name="psat-bad", run_id=run_id, trade_off=0.9, tracking_uri=uri
        )
    client = MlflowClient(uri)
    assert client.search_registered_models() == []
    assert client.list_artifacts(run_id) == []


def test_predict_rejects_pixels_outside_unit_range(tmp_path, members, images, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register(uri, tmp_path, members, "psat-range", 0.5)
    with tracking(uri):
        model = mlflow.pyfunc.load_model("models:/psat-range@champion")
    with pytest.raises(MlflowException, match=r"in \[0, 1\]"):
        model.predict((images * 255).numpy())
    with pytest.raises(MlflowException, match="NaN or infinity"):
        model.predict(torch.full_like(images, float("nan")).numpy())
    with pytest.raises(Exception, match="does not match expected shape"):
        model.predict(images[:, :, :4].numpy())


SERVED = "models:/psat-served@champion"
SERVERS = {  # MLflow's server from a venv without psat: the version brings its code
    "mlflow": [
        "mlflow",
        "models",
        "serve",
        "--env-manager",
        "local",
        "-m",
        SERVED,
        "--host",
        "127.0.0.1",
        "-p",
    ],  # fmt: skip
    "psat": ["psat", "serve", SERVED, "--max-body-mb", "0.05", "--max-rows", "6", "--port"],
}


def post(port: int, body: dict):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(request, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("command", SERVERS)
def test_served_model_answers_like_predict(
    server, tmp_path, members, images, monkeypatch, command, request
):
    monkeypatch.chdir(tmp_path)
    register(server, tmp_path, members, "psat-served", 0.5)
    ensemble = ensemble_from_checkpoints(members)
    port = free_port()
    bin = request.getfixturevalue("plain_bin") if command == "mlflow" else BIN
    executable, *args = SERVERS[command]
    proc = start(
        [str(bin / executable), *args, str(port)],
        tmp_path / "serve.log",
        env={"MLFLOW_TRACKING_URI": server, "HOME": str(tmp_path)},  # psat pulls to ~/.psat
        bin=bin,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, tmp_path / "serve.log")
        for strategy in ("lowest_entropy", "average"):
            body = {"inputs": images.tolist(), "params": {"strategy": strategy}}
            with post(port, body) as response:
                served = pd.DataFrame(json.load(response)["predictions"])
            expected = pd.DataFrame(ensemble.predict(images, strategy))
            pd.testing.assert_frame_equal(served, expected, check_exact=True)
        nan = torch.full_like(images, float("nan")).tolist()
        bad = [
            ({"inputs": nan}, "NaN or infinity"),
            ({"inputs": (images * 255).tolist()}, "in [0, 1]"),
            ({"inputs": images.tolist(), "params": {"strategy": "vote"}}, "unknown strategy"),
        ]
        if command == "psat":  # MLflow's server drops undeclared params with a logged warning
            params = {"strategy": "average", "temperature": 2}
            bad.append(({"inputs": images.tolist(), "params": params}, "['temperature']"))
            # bounded requests: 7 rows (the limit is 6); 200 rows, over 0.05 MB, unread
            bad.append(({"inputs": images[[0] * 7].tolist()}, "7 rows in one request"))
            big = {"inputs": images[[0] * 200].tolist()}
            assert len(json.dumps(big)) > 52_428
            bad.append((big, "the limit is 52,428 (psat serve --max-body-mb)"))
        for body, reason in bad:
            with pytest.raises(urllib.error.HTTPError) as answer:
                post(port, body)
            assert answer.value.code == (413 if "max-body" in reason else 400)
            error = json.load(answer.value)
            assert reason in error["message"] and "stack_trace" not in error
        with post(port, {"inputs": images.tolist()}) as response:  # and it answers on
            assert response.status == 200
    finally:
        stop(proc)


def test_serve_refuses_a_port_in_use_before_it_pulls(server, tmp_path):
    """A port in use is refused first: a model that is not even registered is never looked up."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [str(BIN / "psat"), "serve", "models:/psat-never-registered/1", "--port", str(port)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env=os.environ | {"MLFLOW_TRACKING_URI": server, "HOME": str(tmp_path)},
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"psat serve: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "choose --port"
    )


REGISTER = textwrap.dedent(
    """
    import sys
    from mlflow import MlflowClient
    from orchestrator.registry.register import register_ensemble
    name, uri, model, *dirs = sys.argv[1:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("concurrent")
    run_id = client.create_run(experiment.experiment_id, run_name=name).info.run_id
    result = register_ensemble(dict(zip(("linf", "l2", "l1"), dirs)), model_name=model,
                               run_id=run_id, trade_off=0.4, tracking_uri=uri)
    print("VERSION", result.version, run_id)
    """
)


@pytest.mark.slow
def test_concurrent_registrations_get_distinct_versions(server, tmp_path, members):
    """Two jobs' aggregations register the same model name at the same moment (two processes
    on one tracking server): two versions, one per run, and both aliases set."""
    MlflowClient(server).create_experiment("concurrent")
    dirs = [str(members[n]) for n in NORMS]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER, f"job-{i}", server, "psat-conc", *dirs],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
    lines = [line.split() for out in outputs for line in out.splitlines()]
    assert sorted(int(words[1]) for words in lines if words[:1] == ["VERSION"]) == [1, 2]
    client = MlflowClient(server)
    versions = client.search_model_versions("name = 'psat-conc'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert len({v.run_id for v in versions}) == 2
    assert aliases(server, "psat-conc")[CANDIDATE] in (1, 2)
    assert aliases(server, "psat-conc")[CHAMPION] in (1, 2)
