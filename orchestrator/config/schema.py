"""The job configuration: one YAML file -> one validated `JobConfig`.

Sections: data, model, attacks, evaluation, training, resources, storage, tracking, registry,
sweep, reproduce.
An invalid file raises `ConfigError` naming the field, the value and what is allowed, before any
Ray or MLflow work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.config.file import ConfigError, read_config_file
from orchestrator.config.locations import absolute
from psat_core.settings import (
    ARCHS,
    DATASETS,
    LIGHTWEIGHT,
    NORMS,
    PHASES,
    SCHEDULES,
    AttackConfig,
    attack_defaults,
    dataset_info,
)

Norm = Literal["linf", "l2", "l1"]


def _one_of(kind: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")
    return value


class Section(BaseModel):
    # no inf/nan anywhere; `true` is not a number (pydantic's lax mode would take it as 1)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _bool_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        kinds = get_args(cls.model_fields[info.field_name].annotation)
        kinds = kinds or (cls.model_fields[info.field_name].annotation,)
        if isinstance(value, bool) and bool not in kinds and {int, float} & set(kinds):
            raise ValueError("expected a number, not a boolean")
        return value


class DataConfig(Section):
    dataset: str = "digits"
    data_dir: str = "~/.psat/data"
    download: bool = False
    train_size: int | None = Field(None, gt=0, description="train on a fixed-seed subset")
    val_size: int = Field(256, gt=0, description="held-out slice of the train split")
    eval_size: int | None = Field(None, gt=0, description="test-split subset for evaluation")
    seed: int = 0

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return _one_of("dataset", value, DATASETS)


class ModelConfig(Section):
    arch: str = "resnet18"
    embedding_dim: int = Field(64, gt=0)
    reduction: Literal["sum", "avg", "max"] = "sum"
    init: Literal["fan_in", "shared"] = Field(
        "fan_in", description="generated layers start at their plain conv's std, or all at one"
    )
    kernel_norm: Literal["none", "filter"] = Field(
        "none",
        description="generated kernels as generated (the paper's), or each filter at unit norm "
        "times BatchNorm's learned gain (beyond the paper; no parameter added)",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return _one_of("arch", value, ARCHS)


class AttackOverride(Section):
    eps: float | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    step_size: float | None = Field(None, gt=0)
    restarts: int | None = Field(None, gt=0)
    random_start: bool | None = None


class AttacksConfig(Section):
    """Per-norm overrides of `psat_core.attacks.attack_defaults`: `train` (the training attack),
    `validation` (per-epoch validation) and `eval` (the final evaluation's PGD and radii)."""

    train: dict[Norm, AttackOverride] = {}
    validation: dict[Norm, AttackOverride] = {}
    eval: dict[Norm, AttackOverride] = {}


class EvaluationConfig(Section):
    """What a final evaluation (aggregation, reproduction) attacks with (psat_core.attacks.suites).

    `suite`: `strong` (PGD, APGD-CE/APGD-T, the third-party cross-check and, on ensembles, the
    gate and transfer attacks) or `paper` (per-norm PGD only, as the paper evaluates);
    `apgd_steps`: APGD's iterations (AutoAttack: 100);
    `chunk_images`: each row (a model, an ensemble) is evaluated in chunks of this many images,
    one Ray task each, seeded by their images' positions: numbers independent of how many run
    at once; `concurrent_chunks`: chunks evaluated at once (default: as many as the cluster's
    CPUs or GPUs hold). Each task holds torch in memory (about 1 GB); a finished chunk's
    process takes the next without a second start-up.
    """

    suite: Literal["paper", "strong"] = "strong"
    apgd_steps: int = Field(100, gt=0)
    gate_temperature: float = Field(0.1, gt=0, description="SoftGate's τ (entropy in nats)")
    square_queries: int = Field(
        5000, gt=0, description="the Square attack's queries on ensembles (AutoAttack: 5,000)"
    )
    chunk_images: int = Field(256, gt=0)
    concurrent_chunks: int | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "concurrent_rows" in data:
            raise ValueError(
                "concurrent_rows is now concurrent_chunks (since psat 0.2 rows are evaluated in "
                "chunks of chunk_images, one Ray task each); rename it"
            )
        return data


class GroupScale(Section):
    """Multipliers of `training.lr` and `training.weight_decay` for one parameter group."""

    lr: float = Field(1.0, gt=0)
    weight_decay: float = Field(1.0, ge=0)


OptimizerName = Literal["sgd", "adam", "adamw"]


class OptimizerConfig(Section):
    """The members' optimizer and its per-group settings (`psat_core.steps.param_groups`): a
    hypernetwork's shared generator, its layer embeddings, and the rest (stem, BN, head).
    `momentum` applies to SGD; Adam and AdamW keep their default betas."""

    name: OptimizerName = "adam"
    generator: GroupScale = GroupScale()
    generator_out: GroupScale | None = Field(
        None,
        description="the generator's output matrix W_out, B_out (eq. 11) as a group of its own; "
        "unset: it follows `generator`",
    )
    embeddings: GroupScale = GroupScale()
    rest: GroupScale = GroupScale()

    def scales(self) -> dict[str, tuple[float, float]]:
        return {g: (s.lr, s.weight_decay) for g, s in self if isinstance(s, GroupScale)}


class BaselinesConfig(Section):
    """The plain ResNets' optimizer: the reproduction's NAT and AT baselines and
    `bench/member_parity.py`'s AT_ℓp (SGD with momentum, as Madry et al. train them)."""

    name: OptimizerName = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)


class TrainingConfig(Section):
    """How every model trains; `lr`, `momentum`, `weight_decay` and `optimizer` are the
    hypernetwork models' (PSAT's members, H_NAT), `baselines` the plain ResNets'. The members'
    defaults (Adam, 0.002, no weight decay) are measured: README, "Member parity"."""

    members: list[Norm] = Field(list(NORMS), min_length=1)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()  # before its settings: they check its name
    lr: float = Field(0.002, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    baselines: BaselinesConfig = BaselinesConfig()
    schedule: str = "cosine"
    amp: bool = True
    seed: int = 0
    attack_bn: Literal["running", "batch"] = Field(
        "running",
        description="the BatchNorm statistics the training attack crafts with: running (the "
        "paper's, eval mode) or batch (train mode, running statistics frozen; beyond the paper)",
    )
    checkpoint: Literal["best", "last"] = Field(
        "best",
        description="the checkpoint a model is used by: its epoch of highest validation "
        "trade-off (ties: the later), or its last epoch",
    )

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        return _one_of("schedule", value, SCHEDULES)

    @field_validator("members")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"members must be distinct norms, got {value}")
        return value

    @field_validator("lr", "momentum", "weight_decay")
    @classmethod
    def _optimizer_named(cls, value: float, info: ValidationInfo) -> float:
        # runs only for a value given; the default optimizer was SGD (lr 0.1, wd 5e-4) before
        # 2026-12: a setting written for it must not silently drive Adam
        optimizer = info.data.get("optimizer")
        if optimizer is not None and "name" not in optimizer.model_fields_set:
            raise ValueError(
                "given without training.optimizer.name: the members' optimizer is adam by "
                "default (lr 0.002, weight_decay 0); name the optimizer this is for "
                "(optimizer: {name: sgd} keeps SGD)"
            )
        return value

    def optimizer_settings(self, hypernetwork: bool) -> tuple:
        """(lr, momentum, weight_decay, name, group scales) for a hypernetwork or a plain model."""
        if hypernetwork:
            return (
                self.lr, self.momentum, self.weight_decay,
                self.optimizer.name, self.optimizer.scales(),
            )  # fmt: skip
        b = self.baselines
        return b.lr, b.momentum, b.weight_decay, b.name, None


class ResourcesConfig(Section):
    """What each model's Ray Train workers ask for.

    With `use_gpu`, each worker holds `gpus_per_worker` of a GPU (0.33: three members share
    one) and trains on the one Ray assigns it; a node whose CUDA sees none (GPUs declared to
    Ray only) trains on its CPU, and says so. `ddp_backend` (several workers per member: DDP's
    process group): auto is NCCL with GPUs, else gloo.
    """

    workers_per_member: int = Field(1, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1, gt=0, description="with use_gpu; above 1, a whole number")
    ddp_backend: Literal["auto", "nccl", "gloo"] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    torch_threads: int = Field(1, gt=0, description="torch threads per worker")
    max_failures: int = Field(2, ge=0)
    address: str | None = Field(None, description="Ray address; None: connect or start locally")

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and value != int(value):  # Ray's rule for fractional resources
            raise ValueError("a fraction of a GPU must be at most 1; above 1, a whole number")
        return value

    @property
    def gpus(self) -> float:
        """GPUs one worker holds (0 without use_gpu)."""
        return self.gpus_per_worker if self.use_gpu else 0

    @property
    def cpus_per_model(self) -> float:
        """CPUs one model's workers hold together."""
        return self.workers_per_member * self.cpus_per_worker

    @property
    def gpus_per_model(self) -> float:
        """GPUs one model's workers hold together (0 without use_gpu)."""
        return self.workers_per_member * self.gpus

    def ray_address(self) -> str | None:
        """The cluster to join: `address`, else $RAY_ADDRESS (set inside Ray Jobs), else None
        (a local Ray)."""
        return self.address or os.environ.get("RAY_ADDRESS")


class StorageConfig(Section):
    path: str = "./psat_runs"

    def resolved(self) -> str:
        """Local paths become absolute (Ray workers run elsewhere); URIs stay as given."""
        return absolute(self.path)


class TrackingConfig(Section):
    uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str = "psat"

    def resolved_uri(self) -> str:
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI")
        return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


class RegistryConfig(Section):
    model_name: str = "psat-ensemble"
    strategy: Literal["lowest_entropy", "average"] = "lowest_entropy"
    force_champion: bool = False


SWEEP_PARAMS = (
    "norm", "embedding_dim", "steps", "step_size", "random_start", "lr",
    "optimizer", "generator_lr", "embeddings_lr",  # training.optimizer: name, lr multipliers
)  # fmt: skip
RANGE_PARAMS = ("step_size", "lr", "generator_lr", "embeddings_lr")


class SweepRange(Section):
    """A continuous range, sampled uniformly (log-uniformly when `log`)."""

    low: float = Field(gt=0)
    high: float = Field(gt=0)
    log: bool = False


class SweepConfig(Section):
    """Ray Tune search over member settings; the evaluation threat model is never swept.

    `space` maps a parameter of SWEEP_PARAMS to a list of values or (step_size, lr) a range.
    With `search: grid` lists are crossed exhaustively; `random` and `optuna` sample them.
    """

    space: dict[str, list[Any] | SweepRange] = {"embedding_dim": [32, 64], "norm": list(NORMS)}
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, gt=0)
    asha: bool = True
    grace_period: int = Field(1, gt=0)
    reduction_factor: float = Field(2, gt=1)
    max_t: int | None = Field(None, gt=0, description="ASHA's epoch cap; default training.epochs")
    max_concurrent_trials: int | None = Field(None, gt=0, description="default: from the cluster")

    @field_validator("space")
    @classmethod
    def _known_params(cls, space: dict[str, Any]) -> dict[str, Any]:
        for name, values in space.items():
            if name not in SWEEP_PARAMS:
                raise ValueError(
                    f"unknown sweep parameter {name!r}; allowed: {', '.join(SWEEP_PARAMS)}"
                )
            if isinstance(values, SweepRange) and name not in RANGE_PARAMS:
                raise ValueError(f"{name} takes a list of values, not a range")
            if isinstance(values, list) and not values:
                raise ValueError(f"{name} needs at least one value")
        for norm in space.get("norm", []):
            if norm not in NORMS:
                raise ValueError(f"unknown norm {norm!r} in sweep space; allowed: {NORMS}")
        for dim in space.get("embedding_dim", []):
            if not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"embedding_dim values must be positive integers, got {dim!r}")
        return space


class ReproduceConfig(Section):
    """The reproduction job: Table 1's baselines, PSAT, Table 3's H_NAT, Figure 2's dimensions,
    Table 5's lightweight networks, each trained `seeds` times.

    Figure 2 trains a PSAT at every dimension of `embedding_dims` and at `model.embedding_dim`
    (Tables 1, 3 and 4's). Table 5 trains each of `lightweight` with SAT (one norm's attack per
    batch). `seeds`: every model is trained with `training.seed` + 0, 1, ..., seeds - 1; tables
    show the mean over seeds, verdicts resample seeds and images. `concurrent_trainers` bounds
    how many models train at once (default: as many as the cluster's CPUs, or GPUs with
    `resources.use_gpu`, hold).
    """

    embedding_dims: list[int] = [8, 16]
    nat_member: bool = True
    lightweight: list[str] = list(LIGHTWEIGHT)
    seeds: int = Field(1, gt=0)
    concurrent_trainers: int | None = Field(None, gt=0)
    output: str = "./psat_reproduce"

    @field_validator("embedding_dims")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(dim <= 0 for dim in value):
            raise ValueError(f"needs at least one positive dimension, got {value}")
        return value

    @field_validator("lightweight")
    @classmethod
    def _known_lightweight(cls, value: list[str]) -> list[str]:
        for name in value:
            _one_of("lightweight network", name, LIGHTWEIGHT)
        return value


class JobConfig(Section):
    # a folder name and MLflow tags: letters, digits, '_', '.', '-', at most 100 of them
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attacks: AttacksConfig = AttacksConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    training: TrainingConfig = TrainingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    sweep: SweepConfig = SweepConfig()
    reproduce: ReproduceConfig = ReproduceConfig()

    def attack_configs(
        self, phase: Literal["train", "validation", "eval"]
    ) -> dict[str, AttackConfig]:
        """Dataset defaults with this file's overrides applied, for every norm."""
        overrides = getattr(self.attacks, phase)
        return attack_defaults(
            self.data.dataset,
            phase,
            {norm: o.model_dump(exclude_none=True) for norm, o in overrides.items()},
        )

    @property
    def dataset(self):
        return dataset_info(self.data.dataset)

    @model_validator(mode="after")
    def _sizes_fit_the_dataset(self) -> JobConfig:
        data, info = self.data, dataset_info(self.data.dataset)
        train = info.train_images
        if data.val_size >= train:
            raise ValueError(
                f"data.val_size {data.val_size} leaves no training images: {info.name}'s "
                f"train split has {train}; lower it"
            )
        if data.train_size is not None and data.train_size + data.val_size > train:
            raise ValueError(
                f"data.train_size {data.train_size} + data.val_size {data.val_size} exceed the "
                f"{train} images of {info.name}'s train split; at most {train - data.val_size} "
                "train images, or leave train_size unset for all"
            )
        if data.eval_size is not None and data.eval_size > info.test_images:
            raise ValueError(
                f"data.eval_size {data.eval_size} exceeds the {info.test_images} images of "
                f"{info.name}'s test split; lower it or leave it unset for all"
            )
        return self


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a check across fields: its message names them
            lines.append(e["msg"].removeprefix("Value error, "))
            continue
        field = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        shown = "missing" if e["type"] == "missing" else f"value {value!r}"
        lines.append(f"field '{field}': {shown}: {e['msg']}")
    return "; ".join(lines)


def parse_config(data: Any, source: str = "<config>", overrides: dict | None = None) -> JobConfig:
    """Validate a mapping (e.g. parsed YAML) into a JobConfig; `overrides` are deep-merged first."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = deep_merge(data, overrides)
    try:
        config = JobConfig.model_validate(data)
        for phase in PHASES:
            config.attack_configs(phase)  # the merged attack settings must be valid too
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format(err)}") from None
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    return config


def load_config(path: str | Path, overrides: dict | None = None) -> JobConfig:
    return parse_config(read_config_file(path), str(path), overrides)


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
