"""The PSAT ensemble in the MLflow Model Registry: log, register, promote, pull, load.

A registered version is an MLflow pyfunc model (:class:`PSATModel`) whose artifacts are the
member checkpoint directories (``member.json`` + ``state.pt``, loaded with
``weights_only=True``). Its contract:

* input: a float32 tensor ``N x C x H x W`` of pixels in [0, 1] (``C, H, W`` of the members'
  dataset, e.g. ``1 x 8 x 8`` for digits, ``3 x 32 x 32`` for CIFAR-10); as JSON for
  ``mlflow models serve``: ``{"inputs": [[[[...]]]]}``.
* optional param ``strategy``: ``"lowest_entropy"`` (eq. 12, the default the version was
  registered with) or ``"average"`` (Table 4).
* output: one row per image, ``class`` (int64), ``probability`` (float64, the ensemble's
  probability of that class) and ``member`` (str, the member that answered, e.g. ``"linf"``).

Every registration adds a new version (never overwritten) and points the alias ``candidate``
at it; ``champion`` moves to it only when its trade-off accuracy beats the current champion's
(or when forced). This module does not import Ray, so a model loads in any plain process.

Example::

    ensemble = load_ensemble("models:/psat-digits@champion")
    model = mlflow.pyfunc.load_model("models:/psat-digits@champion")
    model.predict(images)  # DataFrame: class, probability, member
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

import psat_core
from psat_core.accounting import plain_parameters
from psat_core.checkpoint import SPEC_FILE, STATE_FILE, MemberSpec, load_member, read_spec
from psat_core.data import dataset_info
from psat_core.ensemble import STRATEGIES, PSATEnsemble
from psat_core.models import count_parameters

log = logging.getLogger(__name__)

MODEL_PATH = "ensemble"  # the model's name inside its run
CANDIDATE, CHAMPION = "candidate", "champion"
TRADE_OFF_TAG, STRATEGY_TAG = "psat.trade_off", "psat.strategy"
MEMBERS_TAG, RUN_TAG, PARTIAL_TAG = "psat.members", "psat.run_id", "psat.partial"
MEMBER_TAG = "psat.member"  # psat.member.<name>: that member's MemberSpec.describe()
DIGEST_TAG = "psat.sha256"
EXAMPLE_SIZE = 4
PREDICT_BATCH = 256
OUTPUT_COLUMNS = ("class", "probability", "member")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
# The model-from-code file MLflow stores with every version and runs to rebuild the model.
_MODEL_CODE = """\
import mlflow

from orchestrator.registry import PSATModel

mlflow.models.set_model(PSATModel())
"""


# --------------------------------------------------------------------------- the ensemble


def build_ensemble(
    member_dirs: Mapping[str, str | Path], strategy: str = "lowest_entropy"
) -> PSATEnsemble:
    """The :class:`PSATEnsemble` of the member checkpoints ``{name: directory}``, in eval mode.

    Raises:
        ValueError: no members, a checkpoint whose tensors do not fit its spec's architecture,
            or members that disagree on classes, input channels or dataset.
        FileNotFoundError: a directory without ``member.json`` or ``state.pt``.
    """
    if not member_dirs:
        raise ValueError("an ensemble needs at least one member checkpoint, got none")
    specs = {name: read_spec(directory) for name, directory in member_dirs.items()}
    _check_compatible(specs, member_dirs)
    members = [load_member(directory) for directory in member_dirs.values()]
    return PSATEnsemble(members, strategy, names=list(member_dirs)).eval()


def _check_compatible(specs: Mapping[str, MemberSpec], dirs: Mapping[str, str | Path]) -> None:
    first_name, first = next(iter(specs.items()))
    for name, spec in specs.items():
        for field in ("num_classes", "in_channels", "dataset"):
            if getattr(spec, field) != getattr(first, field):
                raise ValueError(
                    f"member {name!r} ({dirs[name]}) has {field}={getattr(spec, field)!r} but "
                    f"member {first_name!r} has {getattr(first, field)!r}; "
                    "an ensemble's members must agree"
                )


def input_shape(spec: MemberSpec) -> tuple[int, int, int]:
    """``(C, H, W)`` of one image for a member trained on ``spec.dataset``."""
    size = dataset_info(spec.dataset).image_size
    return (spec.in_channels, size, size)


@torch.inference_mode()
def predict_frame(
    ensemble: PSATEnsemble,
    images: torch.Tensor,
    strategy: str | None = None,
    batch_size: int = PREDICT_BATCH,
) -> pd.DataFrame:
    """Per image: the ensemble's class, its probability and the member that answered.

    The one prediction path of the registered model: :class:`PSATModel` calls it too, so the
    in-memory ensemble and the pyfunc model answer bit for bit alike on the same device.

    Args:
        ensemble: the members, in eval mode.
        images: float ``N x C x H x W`` in [0, 1], on the ensemble's device.
        strategy: a key of :data:`psat_core.ensemble.STRATEGIES`; default the ensemble's own.
        batch_size: images per forward pass.

    Returns:
        DataFrame with columns ``class`` (int64), ``probability`` (float64), ``member`` (str).
    """
    strategy = strategy or ensemble.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {sorted(STRATEGIES)}")
    classes, probabilities, members = [], [], []
    for batch in images.split(batch_size):
        # the strategy is applied here, not set on the ensemble: requests may run concurrently
        logits, member = STRATEGIES[strategy](ensemble.member_logits(batch))
        probability, label = logits.softmax(dim=-1).max(dim=-1)
        classes.append(label.cpu())
        probabilities.append(probability.cpu())
        members.append(member.cpu())
    names = np.asarray(ensemble.names, dtype=object)
    return pd.DataFrame(
        {
            "class": torch.cat(classes).numpy().astype(np.int64),
            "probability": torch.cat(probabilities).double().numpy(),
            "member": names[torch.cat(members).numpy()],
        },
        columns=list(OUTPUT_COLUMNS),
    )


def member_digest(directory: str | Path) -> str:
    """sha256 over a checkpoint's spec and state files: what a pulled version is checked against."""
    digest = hashlib.sha256()
    for name in (SPEC_FILE, STATE_FILE):
        digest.update(name.encode())
        with open(Path(directory) / name, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the pyfunc model


class PSATModel(mlflow.pyfunc.PythonModel):
    """The registered PSAT ensemble as an MLflow pyfunc model.

    ``model_config`` (stored in the MLmodel file) holds ``members`` (names, in order),
    ``strategy``, ``input_shape`` ``[C, H, W]`` and each member's sha256 ``digests``; the
    artifacts ``member_<name>`` are the checkpoint directories. ``load_context`` verifies the
    digests and rebuilds the ensemble (on the GPU when there is one); ``predict`` answers as
    described in the module docstring.
    """

    def load_context(self, context) -> None:
        config = context.model_config
        dirs = {name: context.artifacts[f"member_{name}"] for name in config["members"]}
        for name, directory in dirs.items():
            if member_digest(directory) != config["digests"][name]:
                raise ValueError(
                    f"member {name!r} at {directory} does not match the digest recorded at "
                    "registration; the model's artifacts are damaged or were replaced"
                )
        self.serve(build_ensemble(dirs, config["strategy"]), tuple(config["input_shape"]))

    def serve(self, ensemble: PSATEnsemble, shape: tuple[int, int, int]) -> None:
        """Answer with `ensemble` (moved to the GPU when there is one) on images of `shape`."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.ensemble = ensemble.to(self.device)
        self.input_shape = shape

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):
        """``model_input``: float ``N x C x H x W`` in [0, 1]; ``params``: optional
        ``{"strategy": ...}``. Returns the DataFrame of :func:`predict_frame`."""
        # a bad request is MLflow's INVALID_PARAMETER_VALUE: the scoring server answers 400
        # with this reason (any other exception is its generic "unexpected error")
        bad_request = MlflowException.invalid_parameter_value
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise bad_request(
                f"expected images N x {' x '.join(map(str, self.input_shape))}, "
                f"got shape {tuple(images.shape)}"
            )
        if not torch.isfinite(images).all():
            raise bad_request("pixels must be finite floats in [0, 1]; got NaN or infinity")
        if images.numel() and not (images.min() >= 0 and images.max() <= 1):
            raise bad_request("pixels must be floats in [0, 1] (divide 8-bit images by 255)")
        strategy = (params or {}).get("strategy") or self.ensemble.strategy
        if strategy not in STRATEGIES:
            raise bad_request(f"unknown strategy {strategy!r}; allowed: {sorted(STRATEGIES)}")
        return predict_frame(self.ensemble, images.to(self.device), strategy)


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
    """The versions this model was logged with; psat itself must be installed where it loads.

    psat's version is its code's (`psat_core.__version__`): on a cluster the code travels as
    py_modules, with no installed distribution to ask.
    """
    packages = ("torch", "mlflow", "numpy", "pandas")
    versions = [f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in packages]
    return [f"psat=={psat_core.__version__}", *versions]


# --------------------------------------------------------------------------- registration


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
def tracking(uri: str | None) -> Iterator[None]:
    """Use tracking (and registry) URI ``uri`` for the fluent MLflow API inside the block."""
    if uri is None:
        yield
        return
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


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
) -> tuple[mlflow.models.model.ModelInfo, PSATEnsemble]:
    """Log the ensemble as a pyfunc model named ``ensemble`` into the active run.

    The members are loaded and checked first, so a bad checkpoint logs nothing. The
    ensemble's answers on ``input_example`` (default: ``EXAMPLE_SIZE`` fixed random images)
    are stored in the model's metadata for :func:`pull` to verify.
    """
    ensemble = build_ensemble(member_dirs, strategy)
    shape = input_shape(read_spec(next(iter(member_dirs.values()))))
    if input_example is None:
        generator = torch.Generator().manual_seed(0)
        input_example = torch.rand(EXAMPLE_SIZE, *shape, generator=generator).numpy()
    input_example = np.ascontiguousarray(input_example, dtype=np.float32)
    expected = predict_frame(ensemble, torch.from_numpy(input_example))
    config = {
        "members": list(member_dirs),
        "strategy": strategy,
        "input_shape": list(shape),
        "digests": {name: member_digest(d) for name, d in member_dirs.items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "psat_model.py"
        code.write_text(_MODEL_CODE)
        # one folder per member name: checkpoint folders of different members often share a
        # base name (checkpoint_000009), and MLflow stores each artifact under its base name
        artifacts = {}
        for name, directory in member_dirs.items():
            staged = Path(tmp) / f"member_{name}"
            staged.mkdir()
            for file in (SPEC_FILE, STATE_FILE):
                shutil.copyfile(Path(directory) / file, staged / file)
            artifacts[staged.name] = str(staged)
        info = mlflow.pyfunc.log_model(
            name=MODEL_PATH,
            python_model=str(code),
            artifacts=artifacts,
            model_config=config,
            signature=signature(shape, strategy),
            input_example=input_example,
            pip_requirements=pip_requirements(),
            metadata={"psat": {"example_output": expected.to_dict(orient="list")}},
        )
    return info, ensemble


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
    tracking_uri: str | None = None,
) -> Registration:
    """Log the ensemble into run ``run_id``, register it as a new version of ``model_name``,
    point ``candidate`` at it, and move ``champion`` to it when ``trade_off`` beats the
    current champion's (or ``force_champion``; the first version becomes champion unless it
    is ``partial``, an ensemble missing some of the job's norms, which needs the force).

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
            info, _ = log_ensemble(member_dirs, strategy=strategy, input_example=input_example)
            # the registry keeps the digests where the artifact store cannot rewrite them
            digests = {f"{DIGEST_TAG}.{n}": member_digest(d) for n, d in member_dirs.items()}
            version_tags = {
                **digests,
                **{f"{MEMBER_TAG}.{n}": read_spec(d).describe() for n, d in member_dirs.items()},
                TRADE_OFF_TAG: repr(float(trade_off)),
                STRATEGY_TAG: strategy,
                MEMBERS_TAG: ",".join(member_dirs),
                RUN_TAG: run_id,
                PARTIAL_TAG: str(partial).lower(),
                **(tags or {}),
            }
            registered = mlflow.register_model(info.model_uri, model_name, tags=version_tags)
            version = int(registered.version)
        client.set_registered_model_alias(model_name, CANDIDATE, str(version))
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
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return True, previous


# --------------------------------------------------------------------------- pull and load


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
    if not isinstance(python_model, PSATModel):
        raise ValueError(f"{uri} is a {type(python_model).__name__}, not a psat ensemble")
    return python_model.ensemble.cpu()


@dataclass(frozen=True)
class PulledModel:
    """A downloaded, verified registered version."""

    uri: str
    name: str
    version: int
    aliases: tuple[str, ...]
    run_id: str | None
    path: Path
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
        return 1.0 - self.parameters / self.plain_parameters

    def lines(self) -> list[str]:
        spec = next(iter(self.specs.values()))
        shape = "x".join(map(str, input_shape(spec)))
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
    _require_store(tracking_uri or mlflow.get_tracking_uri())
    with tracking(tracking_uri):
        client = MlflowClient()
        version = resolve(uri, client)
        aliases = tuple(sorted(version.aliases))
        pinned = f"models:/{version.name}/{version.version}"
        default = Path.home() / ".psat" / "models" / version.name / f"v{version.version}"
        target = Path(dst or default)
        target.mkdir(parents=True, exist_ok=True)
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(target)))
    # verified against the registry's digests before anything is loaded; built by this
    # installed psat (the stored psat_model.py never runs here)
    meta = Model.load(str(path))
    config = meta.flavors["python_function"].get("model_config") or {}
    names = (version.tags.get(MEMBERS_TAG) or "").split(",")
    dirs = {name: path / relative for name, relative in _member_artifacts(meta, names).items()}
    for name, directory in dirs.items():
        recorded = version.tags.get(f"{DIGEST_TAG}.{name}")
        if recorded is None:
            raise ValueError(
                f"{pinned} records no sha256 for member {name!r} in the registry (registered "
                "by an older psat); register it again to pull it"
            )
        if member_digest(directory) != recorded:
            raise ValueError(
                f"{pinned}: member {name!r} at {directory} does not match the sha256 the "
                "registry recorded; the artifacts were damaged or replaced"
            )
    strategy = version.tags.get(STRATEGY_TAG) or config.get("strategy", "lowest_entropy")
    _check_example(path, meta, build_ensemble(dirs, strategy))
    ensemble = build_ensemble(dirs, strategy)  # fresh: the check ran it in inference mode
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
        specs=specs,
        strategy=strategy,
        trade_off=None if recorded is None else float(recorded),
        member_parameters={
            n: count_parameters(m) for n, m in zip(ensemble.names, ensemble.members, strict=True)
        },
        plain_parameters=plain_parameters(spec.arch, spec.num_classes, spec.in_channels),
        ensemble=ensemble,
    )
    for line in pulled.lines():
        echo(line)
    return pulled


def _require_store(uri: str) -> None:
    """A SQLite tracking URI must name an existing file: reading never creates a store."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ValueError(
            f"no MLflow store at {uri}; set --tracking-uri or MLFLOW_TRACKING_URI to the "
            "store the model was registered in"
        )


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
    got = predict_frame(ensemble, torch.from_numpy(np.asarray(example, dtype=np.float32)))
    same = (
        got["class"].tolist() == expected["class"]
        and got["member"].tolist() == expected["member"]
        and np.allclose(got["probability"], expected["probability"], rtol=0, atol=1e-5)
    )
    if not same:
        raise ValueError(
            f"{path}: the model's answers on its input example differ from those recorded at "
            f"registration (got {got.to_dict(orient='list')}, recorded {expected})"
        )
