import os

import pytest

# Ray's default for a local cluster, made explicit before any test starts a process: those
# that join the session's Ray (`ray_address`) present the token Ray keeps in ~/.ray/auth_token
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray Train's controllers poll their workers every 2 s: a tiny run ends up to 2 s after its
# workers. Every Ray the tests start (and its workers) inherits this from the environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture
def tiny_job(tmp_path):
    """A tiny job config dict (digits, 128 images, 2 epochs) storing everything under tmp_path:
    `tiny_job(name, **sections)` (helpers.tiny_config)."""
    from helpers import tiny_config

    def make(name: str, **sections):
        return tiny_config(tmp_path, name, **sections)

    return make


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its schema in place, made once: a new store runs MLflow's
    migrations, about a second in each process that opens it first."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_store(tmp_path, empty_store):
    """`tiny_job`'s tracking store (tmp_path/mlflow.db), empty, its schema made: for tests
    whose jobs use it. Tests of what creates a store, or must not, leave it out."""
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")


@pytest.fixture(scope="session")
def members(tmp_path_factory):
    """Three tiny trained-looking digits members, {norm: checkpoint folder}: written once per
    session (`helpers.write_member`). The same base name for every member, as Ray's checkpoint
    folders have."""
    from helpers import NORMS, write_member

    root = tmp_path_factory.mktemp("members")
    return {n: write_member(root / n / "checkpoint_000002", n, i) for i, n in enumerate(NORMS)}


@pytest.fixture(scope="session")
def agg_rows(tmp_path_factory, members):
    """The aggregation's rows of `members` on `AGG_EVAL` digits test images, in chunks of
    `AGG_CHUNK`, evaluated once per session in this process without Ray
    (`helpers.rows_in_process`): ``(RowResults by key, eval split URI, job)``."""
    import torch
    from helpers import AGG_CHUNK, AGG_EVAL, agg_job, locations, rows_in_process

    from orchestrator.runtime.shards import write_arrays
    from psat_core.data import load_dataset

    root = tmp_path_factory.mktemp("eval")
    eval_uri = str(root / "eval.parquet")
    write_arrays(load_dataset("digits", "test", "unused").subset(AGG_EVAL, seed=0), eval_uri)
    job = agg_job(root, evaluation={"chunk_images": AGG_CHUNK})
    threads = torch.get_num_threads()
    try:
        return rows_in_process(job.model_dump(), locations(members), eval_uri), eval_uri, job
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def torch_threads():
    """What sets the torch threads of this process (e.g. evaluate_checkpoints): restored after."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_ray():
    """One local Ray for every test that needs *a* Ray (Ray's `ray_start_regular_shared`).

    The jobs under test find it initialized and use it (`connect_ray`); jobs in processes of
    their own join it through `ray_address`. It has logical CPUs to spare: a Tune trial can
    leave its worker group's placement group behind (ray-project/ray#54305), which must not
    starve a later test. It declares 3 GPUs (no CUDA needed) for the placement tests. No
    preemption watchers, as `connect_ray` starts a local Ray.
    """
    import logging

    import ray

    # address="local": a Ray of our own, even where a `ray start` cluster runs on this machine
    ray.init(
        address="local",
        num_cpus=12,
        num_gpus=3,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_address(shared_ray) -> str:
    """The shared Ray's GCS address, for `resources.address` of a job run as a process."""
    return shared_ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` (SQLite backend, proxied artifacts) for the whole session;
    tests keep apart by their own experiment and model names. Yields its HTTP URI."""
    import sys
    from pathlib import Path

    from helpers import MlflowServer

    server = MlflowServer(Path(sys.executable).parent, tmp_path_factory.mktemp("mlflow")).start()
    yield server.uri
    server.stop()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, which crawl when other jobs share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
