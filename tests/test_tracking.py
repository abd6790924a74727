"""MLflow tracking helpers on a real SQLite store."""

from mlflow.tracking import MlflowClient

from orchestrator.tracking import ensure_experiment


class RacedClient(MlflowClient):
    """Another job creates the experiment right after this client's first lookup finds none."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.other_job = MlflowClient(uri)
        self.raced_id: str | None = None

    def get_experiment_by_name(self, name):
        found = super().get_experiment_by_name(name)
        if found is None and self.raced_id is None:
            self.raced_id = self.other_job.create_experiment(name)
        return found


def test_experiment_created_once_and_found_again(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    created = ensure_experiment(client, "exp", (tmp_path / "art").as_uri())
    assert ensure_experiment(client, "exp", None) == created
    assert client.get_experiment(created).artifact_location == (tmp_path / "art").as_uri()


def test_experiment_created_by_a_racing_job_is_used(tmp_path):
    client = RacedClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = ensure_experiment(client, "exp", None)
    assert client.raced_id is not None and found == client.raced_id
    assert [e.experiment_id for e in client.search_experiments(filter_string="name = 'exp'")] == [
        found
    ]
