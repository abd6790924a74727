"""Member checkpoints: a JSON spec that rebuilds the model, and tensors loaded with weights_only.

A checkpoint directory holds
    member.json  the `MemberSpec` (architecture, embedding dimension, dataset, norm, ...)
    state.pt     {"model": state_dict, "epoch": int, ...training state...}
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from psat_core.models import create_model

SPEC_FILE = "member.json"
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class MemberSpec:
    """Everything needed to rebuild one trained model.

    `norm` is the perturbation a PSAT member was trained against ("linf", "l2", "l1"); baselines
    use their method name ("nat", "max", "avg", "msd").
    """

    arch: str
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    norm: str
    method: str = "at"
    embedding_dim: int | None = None  # None: a plain ResNet
    reduction: str = "sum"
    extra: dict = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.arch if self.embedding_dim is None else f"hyper_{self.arch}"

    def describe(self) -> str:
        """``"norm linf, method at, hyper_resnet10, embedding 32"``: what this model is."""
        model = self.model_name
        if self.embedding_dim is not None:
            model += f", embedding {self.embedding_dim}"
        return f"norm {self.norm}, method {self.method}, {model}"

    def build(self) -> nn.Module:
        kwargs = {"num_classes": self.num_classes, "in_channels": self.in_channels}
        kwargs |= {"mean": self.mean, "std": self.std}
        if self.embedding_dim is not None:
            kwargs |= {"embedding_dim": self.embedding_dim, "reduction": self.reduction}
        return create_model(self.model_name, **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> MemberSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown member spec fields {sorted(unknown)}; allowed {sorted(known)}"
            )
        data = dict(data, mean=tuple(data["mean"]), std=tuple(data["std"]))
        return cls(**data)


def save_member(directory: str | Path, spec: MemberSpec, state: dict) -> None:
    """Write `spec` and `state` (must hold "model", a state_dict) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
    torch.save(state, directory / STATE_FILE)


def read_spec(directory: str | Path) -> MemberSpec:
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no member spec; is {directory} a psat member checkpoint?")
    return MemberSpec.from_dict(json.loads(path.read_text()))


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The tensors of a checkpoint, loaded with `weights_only=True` (no code runs).

    Raises:
        FileNotFoundError: no state file.
        ValueError: a truncated or corrupt file, or one `weights_only` refuses, naming it.
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no state file in this checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: holds objects other than tensors, which psat never loads (weights_only); "
            "not a psat checkpoint, or tampered with"
        ) from None
    except Exception as err:  # truncated (OSError), corrupt
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: not a loadable psat checkpoint ({reason[:200]}); retrain or restore the file"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: holds no model state_dict; not a psat checkpoint")
    return state


def load_member(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a member from its checkpoint directory, in eval mode.

    A checkpoint whose tensors do not fit the spec's architecture is a ValueError naming it.
    """
    spec = read_spec(directory)
    model = spec.build()
    state = load_state(directory, map_location)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"{directory}: checkpoint does not match architecture {spec.model_name} "
            f"(embedding_dim={spec.embedding_dim}, classes={spec.num_classes}): {err}"
        ) from err
    return model.eval()
