"""Pulling a registered PSAT ensemble: resolve its URI, download, verify, load.

Verification comes before anything stored runs: every member's sha256 against the one the
registry recorded, the members loaded with ``weights_only=True`` into this installed psat's
architectures, and the ensemble's answers on the stored input example against those recorded
at registration. The ``psat_model.py`` stored with the version is never run here.

Example::

    ensemble = load_ensemble("models:/psat-digits@champion")
    pulled = pull("models:/psat-digits@champion")  # prints what it is, member by member
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from orchestrator.runtime.reach import check_store
from orchestrator.runtime.tracking import (
    DIGEST_TAG,
    MEMBERS_TAG,
    STRATEGY_TAG,
    TRADE_OFF_TAG,
    tracking,
)
from psat_core.accounting import plain_parameters, saving, trained_parameters
from psat_core.checkpoint import (
    MemberSpec,
    checkpoint_digest,
    ensemble_from_checkpoints,
    read_spec,
)
from psat_core.ensemble import PSATEnsemble

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def resolve(uri: str, client: MlflowClient | None = None) -> ModelVersion:
    """The model version behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

    Raises:
        ValueError: another kind of URI, or an unknown model, alias or version (the message
            lists what exists).
    """
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ValueError(
            f"expected models:/<name>@<alias> or models:/<name>/<version>, got {uri!r}"
        )
    client = client or MlflowClient()
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(
            f"no registered model {name!r} in registry {mlflow.get_registry_uri()}"
        ) from None
    if alias is not None:
        if alias not in model.aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
            raise ValueError(f"registered model {name!r} has no alias {alias!r} (aliases: {known})")
        version = model.aliases[alias]
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"registered model {name!r} has no version {version}") from None


def load_ensemble(uri: str, tracking_uri: str | None = None) -> PSATEnsemble:
    """A ready :class:`PSATEnsemble` (eval mode, CPU, registered strategy) from a registered
    version (``models:/<name>@<alias>``, ``models:/<name>/<version>``), verified and built as
    :func:`pull` does, or from any other pyfunc model URI (a path, ``runs:/``) you trust.

    Raises ValueError for an unknown model or alias, or artifacts that fail verification.
    """
    if uri.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="psat-load-") as tmp:
            return pull(uri, tmp, echo=lambda line: None, tracking_uri=tracking_uri).ensemble
    with tracking(tracking_uri):
        try:
            python_model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        except MlflowException as err:
            raise ValueError(f"cannot load a psat ensemble from {uri!r}: {err.message}") from err
    ensemble = getattr(python_model, "ensemble", None)  # a PSATModel, built from its own code
    if not isinstance(ensemble, PSATEnsemble):
        raise ValueError(f"{uri} is a {type(python_model).__name__}, not a psat ensemble")
    return ensemble.cpu()


@dataclass(frozen=True)
class PulledModel:
    """A downloaded, verified registered version."""

    uri: str
    name: str
    version: int
    aliases: tuple[str, ...]
    run_id: str | None
    path: Path
    member_dirs: dict[str, Path]
    specs: dict[str, MemberSpec]
    strategy: str
    trade_off: float | None
    member_parameters: dict[str, int]
    plain_parameters: int
    ensemble: PSATEnsemble

    @property
    def parameters(self) -> int:
        return sum(self.member_parameters.values())

    @property
    def saving(self) -> float:
        return saving(self.parameters, self.plain_parameters)

    def lines(self) -> list[str]:
        spec = next(iter(self.specs.values()))
        shape = "x".join(map(str, spec.input_shape))
        trade = "unknown" if self.trade_off is None else f"{self.trade_off:.4f}"
        return [
            f"{self.uri}: {self.name} version {self.version} "
            f"(aliases: {', '.join(self.aliases) or 'none'}; run {self.run_id})",
            f"members: {', '.join(self.specs)}; {spec.dataset}, {spec.num_classes} classes, "
            f"input {shape} in [0, 1]",
            *(
                f"  {name}: {member.describe()}; {self.member_parameters[name]:,} parameters"
                for name, member in self.specs.items()
            ),
            f"strategy: {self.strategy}; trade-off accuracy {trade}",
            f"parameters: {self.parameters:,} vs plain {spec.arch} "
            f"{self.plain_parameters:,} (saving {100 * self.saving:.2f}%)",
            f"downloaded to {self.path}; verified member digests and example predictions",
        ]


def pull(
    uri: str,
    dst: str | Path | None = None,
    echo: Callable[[str], None] = print,
    tracking_uri: str | None = None,
) -> PulledModel:
    """Download a registered version, verify it and say what it is.

    Verification, before anything stored runs: every member's sha256 matches the one the
    registry recorded in the version's tags (the artifact store cannot rewrite those); the
    members load with ``weights_only=True`` into this installed psat's architectures; and the
    ensemble answers the stored input example as the registering process did (classes and
    members exactly, probabilities to 1e-5). The stored ``psat_model.py`` is never run.

    Args:
        uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
        dst: folder to download into (default ``~/.psat/models/<name>/v<version>``).
        echo: where the description goes, line by line.
        tracking_uri: default: MLflow's current tracking URI.

    Raises:
        ValueError: unknown model, alias or version; artifacts that fail verification.
    """
    check_store(tracking_uri or mlflow.get_tracking_uri())
    with tracking(tracking_uri):
        client = MlflowClient()
        version = resolve(uri, client)
        aliases = tuple(sorted(version.aliases))
        pinned = f"models:/{version.name}/{version.version}"
        default = Path.home() / ".psat" / "models" / version.name / f"v{version.version}"
        target = Path(dst or default)
        target.mkdir(parents=True, exist_ok=True)
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(target)))
    # built by this installed psat (the stored psat_model.py never runs here)
    meta = Model.load(str(path))
    config = meta.flavors["python_function"].get(mlflow.pyfunc.MODEL_CONFIG) or {}
    dirs = _verified_members(version, meta, path)
    strategy = version.tags.get(STRATEGY_TAG) or config.get("strategy", "lowest_entropy")
    _check_example(path, meta, ensemble_from_checkpoints(dirs, strategy))
    ensemble = ensemble_from_checkpoints(dirs, strategy)  # fresh: the check ran in inference mode
    specs = {name: read_spec(directory) for name, directory in dirs.items()}
    spec = next(iter(specs.values()))
    recorded = version.tags.get(TRADE_OFF_TAG)
    pulled = PulledModel(
        uri=uri,
        name=version.name,
        version=int(version.version),
        aliases=aliases,
        run_id=version.run_id,
        path=path,
        member_dirs=dirs,
        specs=specs,
        strategy=strategy,
        trade_off=None if recorded is None else float(recorded),
        member_parameters={name: trained_parameters(spec) for name, spec in specs.items()},
        plain_parameters=plain_parameters(spec.arch, spec.num_classes, spec.in_channels),
        ensemble=ensemble,
    )
    for line in pulled.lines():
        echo(line)
    return pulled


def _verified_members(version: ModelVersion, meta: Model, path: Path) -> dict[str, Path]:
    """The downloaded member folders, each checked against the sha256 the registry recorded
    (before anything is loaded)."""
    pinned = f"models:/{version.name}/{version.version}"
    names = (version.tags.get(MEMBERS_TAG) or "").split(",")
    dirs = {name: path / relative for name, relative in _member_artifacts(meta, names).items()}
    for name, directory in dirs.items():
        recorded = version.tags.get(f"{DIGEST_TAG}.{name}")
        if recorded is None:
            raise ValueError(
                f"{pinned} records no sha256 for member {name!r} in the registry (registered "
                "by an older psat); register it again to pull it"
            )
        if checkpoint_digest(directory) != recorded:
            raise ValueError(
                f"{pinned}: member {name!r} at {directory} does not match the sha256 the "
                "registry recorded; the artifacts were damaged or replaced"
            )
    return dirs


def _member_artifacts(meta: Model, names: list[str]) -> dict[str, str]:
    artifacts = meta.flavors["python_function"].get("artifacts", {})
    missing = [name for name in names if f"member_{name}" not in artifacts]
    if missing or not names:
        raise ValueError(f"the registered model has no artifacts for member(s) {missing}")
    return {name: artifacts[f"member_{name}"]["path"] for name in names}


def _check_example(path: Path, meta: Model, ensemble: PSATEnsemble) -> None:
    example = meta.load_input_example(str(path))
    expected = (meta.metadata or {}).get("psat", {}).get("example_output")
    if example is None or expected is None:
        raise ValueError(f"{path}: no input example or recorded answers; not a psat ensemble?")
    got = ensemble.predict(torch.from_numpy(np.asarray(example, dtype=np.float32)))
    same = (
        got["class"].tolist() == expected["class"]
        and got["member"].tolist() == expected["member"]
        and np.allclose(got["probability"], expected["probability"], rtol=0, atol=1e-5)
    )
    if not same:
        answers = {k: v.tolist() for k, v in got.items()}
        raise ValueError(
            f"{path}: the model's answers on its input example differ from those recorded at "
            f"registration (got {answers}, recorded {expected})"
        )
