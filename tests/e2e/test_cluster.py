"""psat on a Ray cluster as a user meets it.

A two-node Ray cluster on 127.0.0.1 with token auth, a real `mlflow server`, psat installed
non-editable (from a wheel) in a fresh venv, and every command run from a folder outside the
checkout. The cluster's own Python has psat's dependencies but not psat: a job runs only if
psat's code travelled with it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, RayCluster, free_port, make_venv
from mlflow.tracking import MlflowClient

NORMS = ("linf", "l2", "l1")
TINY = {
    "training.epochs": 1,
    "data.train_size": 96,
    "data.val_size": 16,
    "data.eval_size": 16,
    "model.embedding_dim": 4,
    **{f"attacks.{phase}.{n}.steps": 1 for phase in ("train", "eval") for n in NORMS},
    **{f"attacks.eval.{n}.restarts": 1 for n in NORMS},
    "evaluation.suite": "paper",
    "evaluation.concurrent_chunks": 2,  # rows reuse two processes
}


def sets(values: dict) -> list[str]:
    return [word for k, v in values.items() for word in ("--set", f"{k}={v}")]


class Site:
    """The cluster, the tracking server and a user's shell outside the checkout."""

    def __init__(self, root: Path, mlflow_uri: str):
        self.root, self.mlflow_uri = root, mlflow_uri
        self.cluster = RayCluster(make_venv(root / "cluster-venv", with_psat=False), root / "ray")
        self.user_bin = make_venv(root / "user-venv", with_psat=True)
        self.home = root / "user"  # the user's folder: no checkout here
        self.home.mkdir()
        shutil.copy(ROOT / "jobs" / "configs" / "quickstart.yaml", self.home / "mine.yaml")
        self.storage = root / "shared" / "runs"  # "shared": both nodes are on this machine
        self.cluster.start()

    def env(self, **extra: str) -> dict[str, str]:
        return self.cluster.env | {
            "PATH": f"{self.user_bin}:{self.cluster.env['PATH']}",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "HOME": str(self.home),  # no ~/.ray/auth_token: the token comes from the env
        } | extra  # fmt: skip

    def psat(self, *args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.user_bin / "psat"), *args], cwd=self.home, env=env or self.env(),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def runs(self, job: str) -> list:
        client = MlflowClient(self.mlflow_uri)
        experiment = client.get_experiment_by_name("psat-quickstart")
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id], f"tags.`psat.job` = '{job}'")

    def ray_jobs(self) -> list:
        """The cluster's Ray jobs (`JobDetails`), read with Ray's own client."""
        script = (
            "import pickle, sys; from ray.job_submission import JobSubmissionClient; "
            f"sys.stdout.buffer.write(pickle.dumps(JobSubmissionClient('{self.cluster.address}')"
            ".list_jobs()))"
        )
        out = subprocess.run(
            [str(self.cluster.bin / "python"), "-c", script], env=self.cluster.env,
            capture_output=True, cwd=self.root, check=True,
        )  # fmt: skip
        return pickle.loads(out.stdout)

    def worker_nodes(self, submission_id: str) -> set[str]:
        """Nodes of the Ray Train workers of one submitted job (Ray's state API)."""
        script = (
            "import sys; from ray.job_submission import JobSubmissionClient; "
            "from ray.util.state import list_actors; "
            f"a = '{self.cluster.address}'; "
            f"job = JobSubmissionClient(a).get_job_info('{submission_id}').job_id; "
            "actors = list_actors(address=a, filters=[('class_name', '=', 'RayTrainWorker'), "
            "('job_id', '=', job)], limit=1000); "
            "print(' '.join(sorted({x.node_id for x in actors})))"
        )
        out = subprocess.run(
            [str(self.cluster.bin / "python"), "-c", script], env=self.cluster.env,
            capture_output=True, text=True, cwd=self.root, check=True,
        )  # fmt: skip
        return set(out.stdout.split())

    def stop(self) -> None:
        self.cluster.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, mlflow_server):
    site = Site(tmp_path_factory.mktemp("site"), mlflow_server)
    yield site
    site.stop()


def submission_id(stdout: str, job: str, command: str) -> str:
    """The Ray job's id psat printed: `<job>-<command>-<UTC time>`."""
    return re.search(rf"submitted ({job}-{command}-\d{{8}}-\d{{6}}): ", stdout)[1]


@pytest.mark.slow
def test_submit_train_aggregate_pull_on_two_nodes(site):
    config = {"name": "two-nodes", "storage.path": site.storage, **TINY}
    command = ["submit", "train", "--config", "mine.yaml", "--address", site.cluster.address,
               *sets(config)]  # fmt: skip
    proc = subprocess.Popen(
        [str(site.user_bin / "psat"), *command], cwd=site.home, env=site.env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = proc.stdout.readline()
    job_id = submission_id(first, "two-nodes", "train")
    again = site.psat(*command)  # the same name while it runs: refused, nothing submitted
    assert again.returncode == 2 and again.stdout == "", again.stdout + again.stderr
    assert re.fullmatch(
        rf"psat submit: error: job 'two-nodes' is already (pending|running) on the cluster as "
        rf"{job_id}; wait for it, stop it \(ray job stop {job_id}\), or set another name\n",
        again.stderr,
    ), again.stderr
    out, err = proc.communicate(timeout=600)
    train = subprocess.CompletedProcess(proc.args, proc.returncode, first + out, err)
    print(train.stdout)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert f"job {job_id} SUCCEEDED" in train.stdout
    jobs = site.ray_jobs()
    assert [j.metadata for j in jobs if j.metadata.get("psat_job") == "two-nodes"] == [
        {"psat_job": "two-nodes", "psat_command": "train"}
    ]  # fmt: skip
    assert "[l1] epoch 1/1" in train.stdout
    assert "INFO dashboard_sdk" not in train.stdout + train.stderr  # Ray's chatter stays out
    runs = {r.data.tags["psat.role"] + ":" + r.data.tags.get("psat.plan", ""): r
            for r in site.runs("two-nodes")}  # fmt: skip
    assert {k for k in runs if k.startswith("model")} == {f"model:{n}" for n in NORMS}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    for norm in NORMS:  # checkpoints under the configured absolute path, not Ray's temp dir
        checkpoint = Path(runs[f"model:{norm}"].data.tags["psat.checkpoint"])
        assert checkpoint.is_relative_to(site.storage / "two-nodes" / f"two-nodes-{norm}")
        assert (checkpoint / "member.json").is_file()
    nodes = site.worker_nodes(job_id)
    assert len(nodes) == 2, nodes  # 3 members, 2 CPUs per node: both nodes train

    aggregate = site.psat("submit", "aggregate", "--config", "mine.yaml", "--address",
                          site.cluster.address, *sets(config))  # fmt: skip
    print(aggregate.stdout)
    assert aggregate.returncode == 0, aggregate.stdout[-3000:] + aggregate.stderr[-3000:]
    assert "registered models:/psat-digits/1" in aggregate.stdout

    pull = site.psat("pull", "models:/psat-digits@champion", "--dst", str(site.home / "pulled"))
    print(pull.stdout)
    assert pull.returncode == 0, pull.stderr
    assert "psat-digits version 1" in pull.stdout and "members: linf, l2, l1" in pull.stdout
    assert not list(site.home.glob("mlflow.db")) and not (site.home / "psat_runs").exists()


@pytest.mark.slow
def test_ray_job_submit_as_the_readme_writes_it(site):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- ray-job-submit")[1].split("```bash\n")[1].split("```")[0]
    storage = site.root / "shared" / "readme-runs"
    script = (
        block.replace("http://<head>:5000", site.mlflow_uri)
        .replace("http://127.0.0.1:8265", site.cluster.address)
        .replace("/mnt/psat/runs", str(storage))
        .rstrip()
    )
    script += " " + shlex.join(sets({"name": "readme", "training.members": "[linf]", **TINY}))
    proc = subprocess.run(
        ["bash", "-euc", script], cwd=ROOT, env=site.env(MLFLOW_TRACKING_URI="unset"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (member,) = [r for r in site.runs("readme") if r.data.tags["psat.role"] == "model"]
    assert member.info.status == "FINISHED"
    assert Path(member.data.tags["psat.checkpoint"]).is_relative_to(
        storage / "readme" / "readme-linf"
    )


def _ray_job(site, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit` of a psat job from the checkout, without a tracking URI in the job."""
    command = ["ray", "job", "submit", "--address", site.cluster.address, "--working-dir", ".",
               "--", *entrypoint]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=site.cluster.env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, storage, message",
    [
        ("relative", "./psat_runs", "storage.path './psat_runs' is relative"),
        ("no-tracking", "ABSOLUTE", "tracking.uri is unset and MLFLOW_TRACKING_URI is not set"),
    ],
)
def test_temporary_locations_are_refused_before_any_work(site, name, storage, message):
    storage = str(site.root / "shared" / name) if storage == "ABSOLUTE" else storage
    config = {"name": name, "storage.path": storage, **TINY}
    # psat submit refuses on the client: one line, exit 2, nothing submitted
    env = site.env()
    if name == "no-tracking":
        del env["MLFLOW_TRACKING_URI"]
    proc = site.psat("submit", "train", "--config", "mine.yaml", "--address",
                     site.cluster.address, *sets(config), env=env)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("psat submit: error: ") and message in line
    assert site.runs(name) == []
    if name != "relative":  # the job's own check of both is test_config's; once on a cluster:
        return
    # the job refuses too, when submitted by hand: failed, before any run or checkpoint
    proc = _ray_job(site, "python", "-m", "jobs.train_members", "--config",
                    "jobs/configs/quickstart.yaml", *sets(config))  # fmt: skip
    assert proc.returncode != 0
    assert f"psat train: error: {message}" in proc.stdout + proc.stderr
    assert "training linf" not in proc.stdout
    assert site.runs(name) == []
    assert not Path(storage).is_absolute() or not Path(storage).exists()


@pytest.mark.slow
@pytest.mark.parametrize("token", ["wrong", None])
def test_auth_errors_are_one_line(site, token):
    args = ["--token", token] if token else []
    env = {k: v for k, v in site.env().items() if k != "RAY_AUTH_TOKEN"}
    config = {"name": "auth", "storage.path": site.storage}
    proc = site.psat("submit", "train", "--config", "mine.yaml", "--address",
                     site.cluster.address, *args, *sets(config), env=env)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    if token:
        assert "refused the auth token from --token" in line
    else:
        assert "requires an auth token and none was found" in line
        assert str(site.home / ".ray" / "auth_token") in line
    assert "RAY_AUTH_MODE=token ray get-auth-token" in line


@pytest.mark.slow
def test_unreachable_address_is_one_line_and_writes_nothing(tmp_path):
    config = tmp_path / "mine.yaml"
    shutil.copy(ROOT / "jobs" / "configs" / "quickstart.yaml", config)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "psat"), "submit", "train", "--config", str(config),
         "--address",
         f"http://127.0.0.1:{free_port()}", "--set", f"storage.path={tmp_path / 'runs'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"),
             "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "cannot reach the Ray cluster" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["mine.yaml"]


@pytest.mark.slow
def test_a_model_larger_than_the_cluster_is_refused(site):
    config = {"name": "too-big", "storage.path": site.storage, "resources.workers_per_member": 5}
    proc = site.psat("submit", "train", "--config", "mine.yaml", "--address",
                     site.cluster.address, *sets(config | TINY))  # fmt: skip
    assert proc.returncode == 1  # the job failed, with the reason in its log
    assert "one model needs 5 CPUs at once (resources.workers_per_member=5" in proc.stdout
    assert "offers at most 4" in proc.stdout  # two nodes of 2 CPUs
    assert site.runs("too-big") == []


HOLD = """
import sys, time
from orchestrator.config import load_config
from orchestrator.runtime.locking import job_lock
with job_lock(load_config(sys.argv[1]), "train"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.slow
def test_uri_storage_is_guarded_by_a_named_actor_on_the_cluster(site):
    config = site.home / "uri.yaml"
    text = yaml.safe_load((site.home / "mine.yaml").read_text())
    text |= {"name": "uri-lock"}
    text["storage"] = {"path": f"file://{site.root / 'shared' / 'uri'}"}
    text["resources"] |= {"address": f"127.0.0.1:{site.cluster.gcs_port}"}
    config.write_text(yaml.safe_dump(text))
    python = str(site.user_bin / "python")

    def hold(seconds: float) -> subprocess.Popen:
        proc = subprocess.Popen(
            [python, "-c", HOLD, str(config), str(seconds)], cwd=site.home, env=site.env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert proc.stdout.readline().strip() == "held", proc.stdout.read()
        return proc

    first = hold(300)
    try:
        proc = site.psat("train", "--config", "uri.yaml")
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("psat train: error: job 'uri-lock' is running: `psat train` (pid ")
        assert "holds the Ray actor psat-jobs/psat-job-uri-lock" in line
    finally:
        first.kill()  # SIGKILL: Ray ends the actor with its driver
        first.wait()
    deadline = time.time() + 60
    while True:  # the name comes free once Ray has noticed the dead driver
        try:
            second = hold(0)
            break
        except AssertionError:
            if time.time() > deadline:
                raise
            time.sleep(2)
    assert second.wait(timeout=60) == 0


RANK = re.compile(r"\[linf\] epoch (\d+) rank (\d) \(pid (\d+), node (\w+)\): (\d+) images "
                  r"from (\S+), weights (\w+)")  # fmt: skip


def train_worker_on(node: subprocess.Popen) -> int | None:
    """The pid of a Ray Train worker process of the node started as `node` (its session), if
    any (read from /proc)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            pid = int(entry.name)
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"RayTrainWorker" in title and os.getsid(pid) == node.pid:
                return pid
    return None


@pytest.mark.slow
def test_one_member_on_two_workers_trains_with_ddp_and_resumes_a_killed_worker(site):
    """`workers_per_member: 2` (gloo), one worker per node: the ranks train on different
    shards, hold equal weights after every epoch (gradients averaged), rank 0 alone writes the
    checkpoints, and a worker killed after the first checkpoint costs the member only the
    epoch it was in: it resumes from its checkpoint (`psat -v` shows each rank's epochs)."""
    epochs = 3
    config = {"name": "ddp", "storage.path": site.storage, **TINY, "training.members": "[linf]",
              "training.epochs": epochs, "data.train_size": 128, "training.batch_size": 32,
              "resources.workers_per_member": 2, "resources.cpus_per_worker": 2,
              "resources.ddp_backend": "gloo"}  # fmt: skip
    proc = subprocess.Popen(
        [str(site.user_bin / "psat"), "-v", "submit", "train", "--config", "mine.yaml",
         "--address", site.cluster.address, *sets(config)], cwd=site.home, env=site.env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    folder = site.storage / "ddp" / "ddp-linf"
    deadline = time.monotonic() + 300
    snapshot = folder / "checkpoint_manager_snapshot.json"  # a checkpoint Ray Train registered
    while not snapshot.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = train_worker_on(site.cluster.procs[1])  # the worker node's rank
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    print(output)
    assert proc.returncode == 0, output[-3000:]
    ranks = {}  # (epoch, rank) -> its last report (the epoch the kill interrupted is redone)
    for found in RANK.finditer(output):
        epoch, rank, pid, node, images, shards, weights = found.groups()
        ranks[int(epoch), int(rank)] = (int(pid), node, int(images), shards, weights)
    assert sorted(ranks) == [(e, r) for e in range(1, epochs + 1) for r in (0, 1)], sorted(ranks)
    for epoch in range(1, epochs + 1):
        zero, one = ranks[epoch, 0], ranks[epoch, 1]
        assert zero[1] != one[1]  # one worker per node
        assert zero[2] + one[2] == 128 and zero[3] != one[3]  # the data split between ranks
        assert zero[4] == one[4]  # DDP: equal weights after every epoch's steps
    last = {ranks[epochs, r][0] for r in (0, 1)}
    assert killed not in last and last.isdisjoint(ranks[1, r][0] for r in (0, 1))  # restarted
    resumed = re.findall(rf"\[linf\] started resuming at epoch (\d)/{epochs} from its checkpoint",
                         output)  # fmt: skip
    assert len(resumed) == 1 and int(resumed[0]) > 1, output[-3000:]
    (run,) = [r for r in site.runs("ddp") if r.data.tags["psat.role"] == "model"]
    client = MlflowClient(site.mlflow_uri)
    starts = client.get_metric_history(run.info.run_id, "start_epoch")
    assert sorted(m.value for m in starts) == [0, int(resumed[0]) - 1]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step for m in losses} == set(range(epochs))  # every epoch trained, none skipped
    checkpoints = [path for path in folder.glob("checkpoint_2*") if path.is_dir()]
    assert checkpoints
    for checkpoint in checkpoints:  # one writer: rank 0's files, nothing else
        assert sorted(p.name for p in checkpoint.iterdir()) == ["member.json", "state.pt"]


@pytest.mark.slow
def test_a_node_lost_mid_training_costs_no_member_its_progress(site):
    """Every process of the worker node killed (a preempted node) while members train there:
    the job finishes on the head's capacity, each lost member resumed from its checkpoint in
    its own MLflow run, and says so in one line per member. The last test of the module: the
    cluster keeps one node after it."""
    cluster = site.cluster
    config = {"name": "node-loss", "storage.path": site.storage, **TINY, "training.epochs": 5,
              "data.train_size": 256, "training.batch_size": 32, "resources.max_failures": 3,
              **{f"attacks.train.{n}.steps": 3 for n in NORMS}}  # fmt: skip
    proc = subprocess.Popen(
        [str(site.user_bin / "psat"), "submit", "train", "--config", "mine.yaml", "--address",
         cluster.address, *sets(config)], cwd=site.home, env=site.env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    worker = cluster.node_ids()["worker"][:8]
    on_worker, lines, killed = set(), [], None
    for line in proc.stdout:
        lines.append(line)
        if "started from scratch" in line and f"node {worker}" in line:
            on_worker.add(line[1 : line.index("]")])
            # its first checkpoint registered by Ray Train (a state.pt alone may not be yet),
            # not its progress line (which lags)
            trigger = line[1 : line.index("]")]
            folder = site.storage / "node-loss" / f"node-loss-{trigger}"
            while not (folder / "checkpoint_manager_snapshot.json").is_file():
                time.sleep(0.05)
            os.killpg(cluster.procs[1].pid, signal.SIGKILL)  # the worker node, every process
            killed = time.monotonic()
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=300)
    first_starts = {}  # each member's first start: where it trained before the node was lost
    for line in lines:
        if " started " in line and line.startswith("["):
            first_starts.setdefault(line[1 : line.index("]")], line)
    on_worker = {name for name, line in first_starts.items() if f"node {worker}" in line}
    ended = time.monotonic()
    output = "".join(lines)
    print(output)
    assert killed is not None and proc.returncode == 0, output[-3000:]
    restarts = [line for line in lines if "after losing its worker" in line]
    assert {line[1 : line.index("]")] for line in restarts} == on_worker, restarts
    assert all(f"on node {worker}" in line for line in restarts), restarts
    # each lost member resumes from its checkpoint, or starts again from scratch when it had
    # none yet (one can start there after the trigger, its first checkpoint still to come); the
    # trigger's was registered before the kill
    resumed = {line[1 : line.index("]")] for line in restarts if "from its checkpoint" in line}
    again = {line[1 : line.index("]")] for line in restarts if "again from scratch" in line}
    assert resumed | again == on_worker and trigger in resumed, restarts
    runs = [r for r in site.runs("node-loss") if r.data.tags["psat.role"] == "model"]
    assert sorted(r.data.tags["psat.plan"] for r in runs) == sorted(NORMS)  # no duplicate runs
    assert all(r.info.status == "FINISHED" for r in runs)
    client = MlflowClient(site.mlflow_uri)
    for run in runs:
        if run.data.tags["psat.plan"] in resumed:  # resumed, not retrained from scratch
            starts = client.get_metric_history(run.info.run_id, "start_epoch")
            assert [m.value for m in starts][0] == 0 and max(m.value for m in starts) > 0
    print(f"node lost -> job finished: {ended - killed:.1f} s")
