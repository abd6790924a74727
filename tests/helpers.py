"""Helpers shared by the tests, one section each: builders (data, member checkpoints, tiny job
configs), Ray's state, the `psat` command line as a process, and real processes (a two-node Ray
cluster with token auth, an `mlflow server`, a fresh venv with psat installed non-editable).

Every process listens on 127.0.0.1 on free ports, keeps its files under the test's temp folder
and is stopped by process group (never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from orchestrator.config import JobConfig, deep_merge, parse_config
from psat_core.checkpoint import MemberSpec, save_member
from psat_core.settings import dataset_info

ROOT = Path(__file__).parents[1]  # the checkout
NORMS = ("linf", "l2", "l1")

# ---------------------------------------------------- builders: data, member checkpoints, tiny jobs


def synthetic(
    n: int, seed: int, classes: int = 4, noise: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of fixed class prototypes in [0, 1] (1x8x8): separable, yet attackable."""
    protos = torch.rand(classes, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = (protos[y] + noise * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


SAT_RADII = {"linf": 0.01, "l2": 0.3, "l1": 4.0}  # far apart: a SAT example's ball names its norm


def sat_norm(x: torch.Tensor, example: torch.Tensor) -> str:
    """The norm whose `SAT_RADII` ball holds every example of a SAT batch (each of the others
    would leave its own ball: the balls are nested, ℓ∞ in ℓ2 in ℓ1 on 8x8 inputs)."""
    delta = (example - x).flatten(1)
    assert delta.abs().sum(1).max() <= SAT_RADII["l1"] + 1e-3  # inside the largest ball
    if delta.abs().amax(1).max() <= SAT_RADII["linf"] + 1e-4:
        return "linf"
    return "l2" if delta.norm(dim=1).max() <= SAT_RADII["l2"] + 1e-4 else "l1"


def write_member(
    directory: Path, norm: str, seed: int, arch: str = "resnet10", embedding_dim: int = 4
) -> Path:
    """A digits member checkpoint; `embedding_dim` other than 4 makes tensors its spec rejects."""
    info = dataset_info("digits")
    spec = MemberSpec(arch, 10, 1, info.mean, info.std, "digits", (norm,), embedding_dim=4)
    torch.manual_seed(seed)
    model = dataclasses.replace(spec, embedding_dim=embedding_dim).build()
    save_member(directory, spec, {"model": model.state_dict(), "epoch": 0})
    return directory


TINY = {
    "data": {"dataset": "digits", "train_size": 128, "val_size": 32, "eval_size": 32},
    "model": {"arch": "resnet10", "embedding_dim": 4},
    "training": {"epochs": 2, "batch_size": 64, "amp": False},
    "attacks": {
        "train": {n: {"steps": 1} for n in NORMS},
        "validation": {n: {"steps": 2} for n in NORMS},
        "eval": {n: {"steps": 2, "restarts": 1} for n in NORMS},
    },
    "evaluation": {"apgd_steps": 2, "square_queries": 5, "concurrent_chunks": 2},
    "resources": {"workers_per_member": 1, "cpus_per_worker": 1, "torch_threads": 1},
}


def tiny_config(tmp_path: Path, name: str, **sections) -> dict:
    """A tiny job config dict (digits, 128 images, 2 epochs) storing everything under
    `tmp_path`; `sections` deep-merged over it (conftest's `tiny_job` fixture)."""
    base = deep_merge(
        TINY,
        {
            "name": name,
            "storage": {"path": str(tmp_path / "runs")},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test"},
        },
    )
    return deep_merge(base, sections)


AGG_EVAL = 8  # test images an aggregation job evaluates
AGG_CHUNK = 4  # conftest's `agg_rows`: 2 chunks per row


def agg_job(tmp_path: Path, name: str = "agg", **sections) -> JobConfig:
    """A tiny aggregation job: `AGG_EVAL` test images, one-step attacks, its own experiment
    and registered model, a Ray of its own (even where another cluster runs on this machine)."""
    agg = {
        # train_size as the job's default: the shards the aggregation writes are its own
        "data": {"train_size": None, "val_size": 16, "eval_size": AGG_EVAL},
        "attacks": {"eval": {n: {"steps": 1, "restarts": 1} for n in NORMS}},
        "resources": {"address": "local"},
        "tracking": {"experiment": "agg"},
        "registry": {"model_name": "psat-agg"},
    }
    return parse_config(deep_merge(tiny_config(tmp_path, name, **agg), sections))


def locations(members: dict[str, Path]) -> dict[str, str]:
    """Member checkpoints (conftest's `members`) as the strings a job's tags and results hold."""
    return {norm: str(path) for norm, path in members.items()}


def training_run(tracker, job, checkpoints: dict[str, str]) -> str:
    """What the training job leaves behind: a parent run tagged with each member's checkpoint."""
    tags = {"psat.job": job.name, "psat.role": "train"}
    tags |= {f"psat.checkpoint.{n}": d for n, d in checkpoints.items()}
    return tracker.client.create_run(tracker.experiment_id, tags=tags).info.run_id


# --------------------------------------------------------- an aggregation's evaluation, without Ray


def evaluate_in_process(job_dict: dict, members: dict[str, str], eval_uri: str):
    """The aggregation's rows (`Evaluation`) evaluated in this process, without Ray."""
    from orchestrator.evaluation.rows import Evaluation

    return Evaluation.of(rows_in_process(job_dict, members, eval_uri))


def rows_in_process(job_dict: dict, members: dict[str, str], eval_uri: str) -> dict:
    """The aggregation's `RowResult`s evaluated in this process, without Ray (each chunk as
    its Ray task would): every member alone, lending its examples, then the ensemble per
    strategy."""
    from orchestrator.evaluation.rows import aggregation_rows
    from orchestrator.evaluation.tasks import evaluate_row, lenders
    from psat_core.ensemble import STRATEGIES

    rows = aggregation_rows(members, STRATEGIES)
    borrowers, lending = lenders(JobConfig.model_validate(job_dict), rows)
    results, lent = {}, {}
    for row in rows:  # members first
        borrowed = [lent[member] for member in borrowers.get(row.key, ())]
        models = {name: members[name] for name in row.models}
        results[row.key], lent[row.key] = evaluate_row(
            job_dict, models, row.strategy, eval_uri, row.key in lending, *borrowed
        )
    return results


# -------------------------------------------------------------------------------------- Ray's state


def _ray_state(ray, lister: str, **options) -> list:
    """`ray.util.state.<lister>` on the Ray of `ray`: every record, live or dead."""
    from ray.util import state

    gcs = ray.get_runtime_context().gcs_address
    return getattr(state, lister)(address=gcs, limit=10_000, raise_on_missing_output=False,
                                  **options)  # fmt: skip


def ray_actors(ray) -> dict:
    """Every actor the Ray of `ray` has had, live or dead, by id (Ray's state API)."""
    return {a.actor_id: a for a in _ray_state(ray, "list_actors")}


def ray_tasks(ray, function: str) -> dict:
    """Every run of the Ray task function `function` the Ray of `ray` has recorded, by task id,
    with its name and times (`creation_time_ms`, `start_time_ms`, `end_time_ms`)."""
    tasks = _ray_state(ray, "list_tasks", filters=[("func_or_class_name", "=", function)],
                       detail=True)  # fmt: skip
    return {t.task_id: t for t in tasks}


# -------------------------------------------------------------- the psat command line, as a process

ENV = os.environ | {"PYTHONPATH": str(ROOT)}  # psat from this checkout, wherever it runs


def psat(*args: str, cwd, timeout: float = 300, env: dict | None = None):
    """`python -m orchestrator.cli ARGS` in `cwd`, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
        text=True, timeout=timeout, env=env or ENV,
    )  # fmt: skip


# ------------------------------------------- real processes: a Ray cluster, an mlflow server, venvs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until `url` answers (any HTTP status, a 401 included); `proc` must live meanwhile."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError as err:
            if getattr(err, "code", None):
                return
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout} s") from err
            time.sleep(0.25)


@contextmanager
def stopped_on_failure(service) -> Iterator[None]:
    """Stop what `service` started so far if the block fails: no process outlives a start
    that did not finish."""
    try:
        yield
    except BaseException:
        service.stop()
        raise


def stop(*procs: subprocess.Popen, grace: float = 10) -> None:
    """Stop processes started with start_new_session=True and everything they started: all
    signalled at once, SIGTERM first, SIGKILL to those still there `grace` seconds later."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30)):
        signalled = []
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
                signalled.append(proc)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for proc in signalled:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        procs = tuple(proc for proc in signalled if proc.poll() is None)
        if not procs:
            return


def make_venv(path: Path, with_psat: bool, hide: tuple[str, ...] = ()) -> Path:
    """A fresh venv that sees this interpreter's third-party packages (through a .pth file) but
    not its psat, nor the packages in `hide` (unimportable in every process it starts); with
    `with_psat`, psat is installed into it from a wheel (non-editable)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if hide:  # a .pth line starting with "import" runs at every interpreter's start
        (Path(purelib) / "hide.pth").write_text(
            f"import sys; sys.modules.update(dict.fromkeys({list(hide)!r}))\n"
        )
    for script in ("ray", "mlflow", "uvicorn"):  # console scripts of the shared packages
        (path / "bin" / script).write_text(
            Path(sys.executable)
            .parent.joinpath(script)
            .read_text()
            .replace(Path(sys.executable).as_posix(), python.as_posix(), 1)
        )
        (path / "bin" / script).chmod(0o755)
    if with_psat:  # built from a copy: no build/ folder in the checkout, nothing stale in it
        source, wheels = path / "source", path / "wheels"
        for name in ("pyproject.toml", "README.md"):
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
        for package in ("psat_core", "orchestrator", "jobs"):
            shutil.copytree(ROOT / package, source / package,
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", str(wheels), str(source)],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            # --ignore-installed: never uninstall the psat this interpreter sees through deps.pth
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
             "--ignore-installed", "--no-compile", *map(str, wheels.glob("psat-*.whl"))],
            check=True, capture_output=True,
        )  # fmt: skip
    return path / "bin"


@dataclass
class RayCluster:
    """Head + one worker node of a token-auth Ray cluster on 127.0.0.1."""

    bin: Path
    root: Path
    cpus_per_node: int = 2
    gpus_per_node: int = 0  # declared to Ray; no CUDA needed
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    procs: list[subprocess.Popen] = field(default_factory=list)
    reserved: list[range] = field(default_factory=list)  # the nodes' worker port ranges
    taken: set[int] = field(default_factory=set)  # every other port given out

    def port(self) -> int:
        """A free port outside every worker port range given out so far."""
        while True:
            port = free_port()
            if not any(port in ports for ports in self.reserved):
                self.taken.add(port)
                return port

    def worker_ports(self) -> range:
        """100 ports for a node's workers, clear of every port given out so far."""
        while True:
            first = free_port() // 100 * 100
            ports = range(first, first + 100)
            if not self.taken.intersection(ports):
                self.reserved.append(ports)
                return ports

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        return env | {
            # the tests' Ray Train poll interval (conftest), for the nodes' workers
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"],
            "RAY_AUTH_MODE": "token",
            # a lost node is declared dead after 3 missed 1 s health checks (default 5 x 3 s)
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_AUTH_TOKEN": self.token,
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": "",
        }

    def _node(self, name: str, *args: str) -> subprocess.Popen:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        workers = self.worker_ports()
        options = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--metrics-export-port",
                   "--runtime-env-agent-port")  # fmt: skip
        ports = {option: self.port() for option in options}
        command = [
            str(self.bin / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.cpus_per_node}", f"--num-gpus={self.gpus_per_node}",
            "--disable-usage-stats", f"--min-worker-port={workers.start}",
            f"--max-worker-port={workers.stop - 1}",
            *(f"{k}={v}" for k, v in ports.items()), *args,
        ]  # fmt: skip
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (lives as long as the node)
        proc = subprocess.Popen(
            command, cwd=self.root / name, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def start(self) -> RayCluster:
        self.gcs_port, self.dashboard_port = self.port(), self.port()
        # Ray's sockets live in its temp dir, and a socket path has at most 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="psat-ray-", dir="/tmp"))
        head = self._node(
            "head", "--head", f"--port={self.gcs_port}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.port()}", f"--temp-dir={self.temp_dir}",
        )  # fmt: skip
        with stopped_on_failure(self):
            wait_http(self.address, head, self.root / "head.log")
            self.add_worker()
            self.wait_nodes(2)
        return self

    def add_worker(self) -> subprocess.Popen:
        """A worker node joining the head (again, after one was lost)."""
        return self._node("worker", f"--address=127.0.0.1:{self.gcs_port}")

    def node_ids(self) -> dict[str, str]:
        """``{"head": id, "worker": id}`` of the live nodes (Ray's state API)."""
        script = (
            "from ray.util.state import list_nodes; "
            f"nodes = list_nodes(address='{self.address}', filters=[('state', '=', 'ALIVE')]); "
            "print(*(('head' if n.is_head_node else 'worker') + '=' + n.node_id for n in nodes))"
        )
        out = subprocess.run(
            [str(self.bin / "python"), "-c", script], env=self.env, capture_output=True,
            text=True, cwd=self.root, check=True,
        )  # fmt: skip
        return dict(pair.split("=") for pair in out.stdout.split())

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        script = (
            "import ray; from ray.util.state import list_nodes; "
            f"print(sum(n.state == 'ALIVE' for n in list_nodes(address='{self.address}')))"
        )
        while time.time() < deadline:
            out = subprocess.run(
                [str(self.bin / "python"), "-c", script], env=self.env, capture_output=True,
                text=True, cwd=self.root,
            )  # fmt: skip
            if out.returncode == 0 and out.stdout.strip() == str(count):
                return
            time.sleep(2)
        raise TimeoutError(f"the Ray cluster did not reach {count} nodes: {out.stderr[-2000:]}")

    def stop(self) -> None:
        # `ray start --block` takes 10 s and more to end its node: nothing of it is kept
        stop(*self.procs, grace=2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class MlflowServer:
    bin: Path
    root: Path
    proc: subprocess.Popen | None = None

    def start(self, port: int | None = None) -> MlflowServer:
        """Start on `port` (default: a free one), e.g. again where it listened before."""
        self.port = port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(
            [str(self.bin / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "2",
             "--uvicorn-opts", "--timeout-graceful-shutdown 3"],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runners
        )  # fmt: skip
        with stopped_on_failure(self):
            wait_http(f"{self.uri}/health", self.proc, self.root / "server.log")
        return self

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@dataclass
class S3Server:
    """A real S3-API server on 127.0.0.1 (moto's server mode, as Ray's storage tests use) and
    the environment pyarrow, Ray's workers and psat reach it with."""

    bin: Path
    root: Path
    proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "s3.log", "w")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(
            [str(self.bin / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        with stopped_on_failure(self):
            wait_http(self.endpoint, self.proc, self.root / "s3.log")
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self):
        """A pyarrow filesystem on this server, for the test's own look."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key="testing", secret_key="testing", region="us-east-1",
            endpoint_override=self.endpoint,
        )  # fmt: skip

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace=2)


# ---------------------------------------------------------------- hostile data files


def write_cifar10(root, per_batch=2, n_test=3):
    """cifar-10-batches-py/: latin1-readable pickles with rows R(1024) G(1024) B(1024)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return written


class RunsCommand:
    """What a pickle can hide: unpickling it runs `command` (a file that is code, not data)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))
