import pytest

TINY = {
    "data": {"dataset": "digits", "train_size": 128, "val_size": 32, "eval_size": 32},
    "model": {"arch": "resnet10", "embedding_dim": 4},
    "training": {"epochs": 2, "batch_size": 64, "lr": 0.05, "amp": False},
    "attacks": {
        "train": {n: {"steps": 1} for n in ("linf", "l2", "l1")},
        "validation": {n: {"steps": 2} for n in ("linf", "l2", "l1")},
        "eval": {n: {"steps": 2, "restarts": 1} for n in ("linf", "l2", "l1")},
    },
    "evaluation": {"apgd_steps": 2},
    "resources": {"workers_per_member": 1, "cpus_per_worker": 1, "torch_threads": 1},
}


@pytest.fixture
def tiny_job(tmp_path):
    """A tiny job config dict (digits, 128 images, 2 epochs) storing everything under tmp_path."""

    def make(name: str, **sections):
        from orchestrator.config import deep_merge

        base = deep_merge(
            TINY,
            {
                "name": name,
                "storage": {"path": str(tmp_path / "runs")},
                "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test"},
            },
        )
        return deep_merge(base, sections)

    return make


@pytest.fixture
def local_ray():
    """A real local Ray of the test's own, with enough logical CPUs for three members at once.

    One per test: a Tune trial's Ray Train worker group can leave its placement group behind
    (ray-project/ray#54305), which must not starve the next test.
    """
    import ray

    # address="local": our own Ray, even where a `ray start` cluster runs (or ran) here
    ray.init(address="local", num_cpus=6, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def own_ray():
    """The code under test starts its own local Ray (`connect_ray`); stop it after the test."""
    import ray

    assert not ray.is_initialized()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, which crawl when other jobs share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
