"""Registering the PSAT ensemble in the MLflow Model Registry: log, register, promote.

A registered version is the pyfunc model of `psat_model` (models-from-code: that file is
stored with the version) and carries everything it runs: the pure-PyTorch `psat_core` as its
code (``code_paths``), requirements naming only public packages, and per member its spec and
weights (``member.json`` + ``weights.safetensors``: tensors only, no optimizer, no pickle). A
plain MLflow client loads and serves it without psat installed. Its evidence (Table 1's
metrics linked to the logged model, the data splits as datasets, the table, the version's
description) comes with it (`ModelEvidence`).

Every registration adds a new version (never overwritten) and points the alias ``candidate``
at it; ``champion`` moves to it only when its trade-off accuracy beats the current champion's
(or when forced). The version's tags record, per member, its sha256 and what it is (method,
norms, architecture, embedding dimension). Pulling and loading a version: `pull`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelInput
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

import psat_core
from orchestrator.runtime.shards import DataSplit
from orchestrator.runtime.terminal import prints_to_log
from orchestrator.runtime.tracking import (
    DIGEST_TAG,
    MEMBER_TAG,
    MEMBERS_TAG,
    PARTIAL_TAG,
    RUN_TAG,
    STRATEGY_TAG,
    TRADE_OFF_TAG,
    tracking,
)
from psat_core.checkpoint import (
    checkpoint_digest,
    ensemble_from_checkpoints,
    export_weights,
    read_spec,
)

log = logging.getLogger(__name__)

MODEL_PATH = "ensemble"  # the model's name inside its run
CANDIDATE, CHAMPION = "candidate", "champion"
EXAMPLE_SIZE = 4
MODEL_CODE = Path(__file__).with_name("psat_model.py")  # stored with, and run by, each version
CORE_CODE = Path(psat_core.__file__).parent  # the code it runs, stored with it too
REQUIREMENTS = ("torch", "numpy", "pandas", "mlflow")  # all it imports (MLflow brings the others)


def signature(shape: tuple[int, int, int], strategy: str) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]),
        outputs=Schema(
            [
                ColSpec("long", "class"),
                ColSpec("double", "probability"),
                ColSpec("string", "member"),
            ]
        ),
        params=ParamSchema([ParamSpec("strategy", "string", strategy)]),
    )


def pip_requirements() -> list[str]:
    """The public packages the model imports, at the versions it was logged with (psat itself
    travels as the model's code)."""
    return [f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in REQUIREMENTS]


@dataclass(frozen=True)
class ModelEvidence:
    """What a registered version was measured with, stored where MLflow 3 shows it: `metrics`
    on the logged model (its page and the version's), measured on the evaluation split;
    `splits` as the run's and model's datasets; `table` (column -> values) as a logged table;
    `description` as the version's."""

    metrics: Mapping[str, float]
    splits: Sequence[DataSplit]
    table: Mapping[str, list]
    description: str


@dataclass(frozen=True)
class Registration:
    """One registered version and what happened to the aliases."""

    name: str
    version: int
    run_id: str
    trade_off: float
    champion: bool  # whether `champion` now points at this version
    previous_champion: int | None  # the version `champion` pointed at before, if any

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def lines(self) -> list[str]:
        if self.champion:
            before = f"v{self.previous_champion}" if self.previous_champion else "none"
            outcome = f"{CHAMPION} -> v{self.version} (was {before})"
        elif self.previous_champion is not None:
            outcome = f"{CHAMPION} stays v{self.previous_champion}"
        else:
            outcome = f"no {CHAMPION} yet (a partial ensemble takes it only when forced)"
        return [
            f"registered {self.uri} (trade-off {self.trade_off:.4f}), {CANDIDATE} -> "
            f"v{self.version}, {outcome}",
            f"pull it: psat pull models:/{self.name}@{CHAMPION}",
        ]


@contextmanager
def _in_run(run_id: str) -> Iterator[None]:
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id):
        yield


def log_ensemble(
    member_dirs: Mapping[str, str | Path],
    *,
    strategy: str = "lowest_entropy",
    input_example: np.ndarray | None = None,
) -> tuple[mlflow.models.model.ModelInfo, dict[str, str]]:
    """Log the ensemble as a pyfunc model named ``ensemble`` into the active run; return it
    and the sha256 of each member as stored.

    The members are loaded and checked first, so a bad checkpoint logs nothing. Each is
    stored as its spec and weights (`export_weights`); `psat_core` goes with them as code. The
    ensemble's answers on ``input_example`` (default: ``EXAMPLE_SIZE`` fixed random images)
    are stored in the model's metadata for :func:`pull` to verify.
    """
    ensemble = ensemble_from_checkpoints(member_dirs, strategy)
    shape = read_spec(next(iter(member_dirs.values()))).input_shape
    if input_example is None:
        generator = torch.Generator().manual_seed(0)
        input_example = torch.rand(EXAMPLE_SIZE, *shape, generator=generator).numpy()
    input_example = np.ascontiguousarray(input_example, dtype=np.float32)
    expected = ensemble.predict(torch.from_numpy(input_example))
    with tempfile.TemporaryDirectory() as tmp:
        # one folder per member name: checkpoint folders of different members often share a
        # base name (checkpoint_000009), and MLflow stores each artifact under its base name
        staged = {
            name: export_weights(directory, Path(tmp) / f"member_{name}")
            for name, directory in member_dirs.items()
        }
        code = shutil.copytree(
            CORE_CODE, Path(tmp) / "code" / CORE_CODE.name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )  # fmt: skip
        config = {
            "members": list(member_dirs),
            "strategy": strategy,
            "input_shape": list(shape),
            "digests": {name: checkpoint_digest(d) for name, d in staged.items()},
        }
        info = mlflow.pyfunc.log_model(
            name=MODEL_PATH,
            python_model=str(MODEL_CODE),
            artifacts={d.name: str(d) for d in staged.values()},
            code_paths=[str(code)],
            model_config=config,
            signature=signature(shape, strategy),
            input_example=input_example,
            pip_requirements=pip_requirements(),
            metadata={
                "psat": {
                    "version": psat_core.__version__,
                    "example_output": {k: v.tolist() for k, v in expected.items()},
                }
            },
        )
    return info, config["digests"]


def _log_evidence(model_id: str, evidence: ModelEvidence) -> None:
    """Datasets, metrics linked to the logged model `model_id`, and the table, into the
    active run (see `ModelEvidence`)."""
    model = LoggedModelInput(model_id)
    datasets = {}
    for split in evidence.splits:
        with warnings.catch_warnings():  # MLflow registers its local-file source twice
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            source = resolve_dataset_source(split.source)
        datasets[split.context] = MetaDataset(source, name=split.name, digest=split.digest)
        tags = {"images": str(split.images)}
        mlflow.log_input(datasets[split.context], context=split.context, tags=tags, model=model)
    measured_on = datasets.get("evaluation")
    mlflow.log_metrics(dict(evidence.metrics), step=0, model_id=model_id, dataset=measured_on)
    mlflow.log_table(dict(evidence.table), artifact_file="table1.json")


def register_ensemble(
    member_dirs: Mapping[str, str | Path],
    *,
    model_name: str,
    run_id: str,
    trade_off: float,
    strategy: str = "lowest_entropy",
    force_champion: bool = False,
    partial: bool = False,
    input_example: np.ndarray | None = None,
    tags: Mapping[str, str] | None = None,
    evidence: ModelEvidence | None = None,
    tracking_uri: str | None = None,
) -> Registration:
    """Log the ensemble (and its `evidence`) into run ``run_id``, register it as a new version
    of ``model_name``, point ``candidate`` at it, and move ``champion`` to it when
    ``trade_off`` beats the current champion's (or ``force_champion``; the first version
    becomes champion unless it is ``partial``, an ensemble missing some of the job's norms,
    which needs the force).

    Invalid members raise before anything is logged or registered. Versions are never
    overwritten. Two registrations racing for ``champion`` both compare against the champion
    they read; the later alias write wins.
    """
    with tracking(tracking_uri), _in_run(run_id):
        client = MlflowClient()
        done = _registered_by(client, model_name, run_id)
        if done is not None:  # an interrupted run registered it: complete, never duplicate
            version = int(done.version)
        else:
            info, digests = log_ensemble(
                member_dirs, strategy=strategy, input_example=input_example
            )
            if evidence is not None:
                _log_evidence(info.model_id, evidence)
            # the registry keeps the digests where the artifact store cannot rewrite them
            version_tags = {
                **{f"{DIGEST_TAG}.{n}": digest for n, digest in digests.items()},
                **{f"{MEMBER_TAG}.{n}": read_spec(d).describe() for n, d in member_dirs.items()},
                TRADE_OFF_TAG: repr(float(trade_off)),
                STRATEGY_TAG: strategy,
                MEMBERS_TAG: ",".join(member_dirs),
                RUN_TAG: run_id,
                PARTIAL_TAG: str(partial).lower(),
                **(tags or {}),
            }
            with prints_to_log():  # "Successfully registered model", "Created version"
                registered = mlflow.register_model(info.model_uri, model_name, tags=version_tags)
            version = int(registered.version)
        if evidence is not None:
            client.update_model_version(model_name, str(version), evidence.description)
        _set_alias(client, model_name, CANDIDATE, version)
        champion, previous = _promote(
            client, model_name, version, trade_off, force_champion, partial
        )
    return Registration(model_name, version, run_id, float(trade_off), champion, previous)


def _registered_by(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version of `name` that run `run_id` registered, if any (one run, one version)."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return found[0] if found else None


def _promote(
    client: MlflowClient, name: str, version: int, trade_off: float, force: bool, partial: bool
) -> tuple[bool, int | None]:
    aliases = client.get_registered_model(name).aliases
    previous = int(aliases[CHAMPION]) if CHAMPION in aliases else None
    if partial and not force:
        return False, previous
    if previous is not None and not force:
        current = client.get_model_version(name, str(previous))
        recorded = current.tags.get(TRADE_OFF_TAG)
        if recorded is None:
            log.warning("%s v%s has no %s tag; replacing it", name, previous, TRADE_OFF_TAG)
        elif not trade_off > float(recorded):
            return False, previous
    _set_alias(client, name, CHAMPION, version)
    return True, previous


# what SQLite, MySQL and PostgreSQL say when two first writes of one alias collide
_ALIAS_RACE = ("UNIQUE constraint failed", "Duplicate entry", "duplicate key value")


def _set_alias(client: MlflowClient, name: str, alias: str, version: int, tries: int = 5) -> None:
    """Point `alias` at `version`. The store writes an alias by read-then-insert, so two
    registrations creating the same alias at once collide on its unique key; the alias exists
    after the first, and the retry overwrites it like any later write."""
    for attempt in range(1, tries + 1):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as err:
            if attempt == tries or not any(text in str(err) for text in _ALIAS_RACE):
                raise
            time.sleep(0.1 * attempt)
