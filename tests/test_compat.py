"""What users already hold keeps working: a version registered by psat 0.1.0's code.

`tests/data/registered-0.1.tar.gz` is a SQLite store and its artifacts as psat 0.1.0 (commit
64dd108, before the orchestrator's layout changed) registered them: three tiny digits members,
`models:/psat-registered-0.1@champion`. Its stored `psat_model.py` imports that release's
`psat_core`; `psat pull` verifies it with today's code.
"""

from __future__ import annotations

import sqlite3
import tarfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from orchestrator.registry.pull import load_ensemble, pull
from psat_core.data import load_dataset

ARCHIVE = Path(__file__).parent / "data" / "registered-0.1.tar.gz"
WRITTEN_AT = "/tmp/psat-registered-0.1"  # where the store was written: its paths start so
URI = "models:/psat-registered-0.1@champion"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """The 0.1.0 store unpacked, its absolute artifact paths moved to where it now lies."""
    root = tmp_path_factory.mktemp("registered-0.1")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(root, filter="data")
    with sqlite3.connect(root / "mlflow.db") as db:
        for (table,) in db.execute("select name from sqlite_master where type = 'table'"):
            for _, column, kind, *_ in db.execute(f"pragma table_info('{table}')"):
                if kind.upper().startswith(("VARCHAR", "TEXT")):
                    db.execute(
                        f"update '{table}' set {column} = replace({column}, ?, ?)",
                        (WRITTEN_AT, str(root)),
                    )
    return f"sqlite:///{root / 'mlflow.db'}"


def test_psat_pull_verifies_and_loads_a_version_registered_by_0_1(store, tmp_path):
    lines: list[str] = []
    pulled = pull(URI, dst=tmp_path / "pulled", echo=lines.append, tracking_uri=store)
    assert (pulled.name, pulled.version, pulled.ensemble.names) == (
        "psat-registered-0.1", 1, ("linf", "l2", "l1")
    )  # fmt: skip
    assert any("verified member digests and example predictions" in line for line in lines)


def test_mlflow_loads_a_version_registered_by_0_1_with_its_stored_code(store, monkeypatch):
    images = load_dataset("digits", "test", "unused").to_float()[:8]
    expected = pd.DataFrame(load_ensemble(URI, tracking_uri=store).predict(images))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    try:
        answered = mlflow.pyfunc.load_model(URI).predict(images.numpy())
    finally:
        mlflow.set_tracking_uri(None)
    pd.testing.assert_frame_equal(answered, expected, check_exact=True)
