"""Member checkpoints: a JSON spec that rebuilds the model, and tensors loaded with weights_only.

A training checkpoint directory holds
    member.json  the `MemberSpec` (architecture, embedding dimension, dataset, method, norms...)
    state.pt     {"model": state_dict, "epoch": int, ...training state...}; AT_mng's noise
                 generator under "noise_generator" (`MetaNoiseTraining.CHECKPOINT_KEY`)
A registered member (`export_weights`) holds member.json and weights.safetensors: the model's
tensors alone, no optimizer state and no pickle, read with torch alone (`read_safetensors`) so
that a registered model loads where only MLflow and PyTorch are installed. Loading reads
whichever of the two files is there.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from psat_core.ensemble import PSATEnsemble
from psat_core.models import create_model
from psat_core.settings import dataset_info
from psat_core.shims import upgrade_spec

SPEC_FILE = "member.json"
STATE_FILE = "state.pt"
WEIGHTS_FILE = "weights.safetensors"


@dataclass(frozen=True)
class MemberSpec:
    """Everything needed to rebuild one trained model, and how it was trained: its `method`
    ("at" for a PSAT member or AT baseline, "nat", "max", "avg", "msd", "mng") against `norms`."""

    arch: str
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    norms: tuple[str, ...]
    method: str = "at"
    embedding_dim: int | None = None  # None: a plain ResNet
    reduction: str = "sum"
    init: str = "shared"  # how generated layers start (HyperResNet); see shims.OLD_SPEC_DEFAULTS
    kernel_norm: str = "none"  # generated filters as generated, or at unit norm (HyperResNet)

    @property
    def model_name(self) -> str:
        return self.arch if self.embedding_dim is None else f"hyper_{self.arch}"

    def describe(self) -> str:
        """``"norm linf, method at, hyper_resnet10, embedding 32"``: what this model is."""
        model = self.model_name
        if self.embedding_dim is not None:
            model += f", embedding {self.embedding_dim}"
        norms = f"norm{'s' * (len(self.norms) != 1)} {','.join(self.norms) or 'none'}"
        return f"{norms}, method {self.method}, {model}"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image of the model's dataset."""
        size = dataset_info(self.dataset).image_size
        return (self.in_channels, size, size)

    def build(self) -> nn.Module:
        kwargs = {"num_classes": self.num_classes, "in_channels": self.in_channels}
        kwargs |= {"mean": self.mean, "std": self.std}
        if self.embedding_dim is not None:
            kwargs |= {"embedding_dim": self.embedding_dim, "reduction": self.reduction}
            kwargs |= {"init": self.init, "kernel_norm": self.kernel_norm}
        return create_model(self.model_name, **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> MemberSpec:
        data = upgrade_spec(data)
        known = set(cls.__dataclass_fields__)
        required = {f.name for f in fields(cls) if f.default is f.default_factory is MISSING}
        unknown, missing = set(data) - known, required - set(data)
        if unknown or missing:
            raise ValueError(
                f"member spec fields: unknown {sorted(unknown)}, missing {sorted(missing)}; "
                f"allowed {sorted(known)} (a checkpoint of another psat version? retrain it)"
            )
        data = dict(data, mean=tuple(data["mean"]), std=tuple(data["std"]))
        return cls(**data | {"norms": tuple(data["norms"])})


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


# the safetensors format: an 8-byte little-endian header size, a JSON header (name -> dtype,
# shape, data_offsets into the bytes that follow), then the tensors' bytes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read with torch alone; a file that breaks the format
    (truncated, offsets outside it, an unknown dtype) is a ValueError naming it."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or 8 + size > len(data):
            raise ValueError("truncated header")
        header = json.loads(data[8 : 8 + size])
        header.pop("__metadata__", None)
        body = memoryview(data)[8 + size :]
        tensors = {}
        for name, entry in header.items():
            dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
            start, end = entry["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if not 0 <= start <= end <= len(body) or end - start != nbytes:
                raise ValueError(f"tensor {name!r} does not fit the file")
            flat = torch.frombuffer(body[start:end], dtype=dtype) if nbytes else torch.empty(0)
            tensors[name] = flat.to(dtype).reshape(shape).clone()
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{path}: not a loadable safetensors file ({err}); restore the registered version"
        ) from None
    return tensors


def model_tensors(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The model's state_dict: from weights.safetensors (a registered member) if there is one,
    else from the training state (`load_state`). A damaged file is a ValueError naming it."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        return load_state(directory, map_location)["model"]
    return {name: t.to(map_location) for name, t in read_safetensors(path).items()}


def export_weights(directory: str | Path, target: str | Path) -> Path:
    """A member as it is registered: `directory`'s spec and its model's tensors as
    safetensors in `target` (nothing of the optimizer, scheduler or RNG; no pickle)."""
    from safetensors.torch import save_file  # writing only: reading needs torch alone

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / SPEC_FILE).write_bytes((Path(directory) / SPEC_FILE).read_bytes())
    tensors = {name: t.contiguous() for name, t in model_tensors(directory).items()}
    save_file(tensors, target / WEIGHTS_FILE)
    return target


def load_member(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a member from its checkpoint directory, in eval mode.

    A checkpoint whose tensors do not fit the spec's architecture is a ValueError naming it.
    """
    spec = read_spec(directory)
    model = spec.build()
    tensors = model_tensors(directory, map_location)
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"{directory}: checkpoint does not match architecture {spec.model_name} "
            f"(embedding_dim={spec.embedding_dim}, classes={spec.num_classes}): {err}"
        ) from err
    return model.eval()


def ensemble_from_checkpoints(
    member_dirs: Mapping[str, str | Path], strategy: str = "lowest_entropy"
) -> PSATEnsemble:
    """The :class:`PSATEnsemble` (eq. 10) of the member checkpoints ``{name: directory}``, in
    eval mode.

    Raises:
        ValueError: no members, a checkpoint whose tensors do not fit its spec's architecture,
            or members that disagree on classes, input channels or dataset.
        FileNotFoundError: a directory without ``member.json`` or ``state.pt``.
    """
    if not member_dirs:
        raise ValueError("an ensemble needs at least one member checkpoint, got none")
    specs = {name: read_spec(directory) for name, directory in member_dirs.items()}
    first_name, first = next(iter(specs.items()))
    for name, spec in specs.items():
        for field_name in ("num_classes", "in_channels", "dataset"):
            if getattr(spec, field_name) != getattr(first, field_name):
                raise ValueError(
                    f"member {name!r} ({member_dirs[name]}) has {field_name}="
                    f"{getattr(spec, field_name)!r} but member {first_name!r} has "
                    f"{getattr(first, field_name)!r}; an ensemble's members must agree"
                )
    members = [load_member(directory) for directory in member_dirs.values()]
    return PSATEnsemble(members, strategy, names=list(member_dirs)).eval()


def checkpoint_digest(directory: str | Path) -> str:
    """sha256 over a checkpoint's spec and tensors (weights.safetensors, else state.pt): what
    a registry records and checks."""
    digest = hashlib.sha256()
    weights = WEIGHTS_FILE if (Path(directory) / WEIGHTS_FILE).is_file() else STATE_FILE
    for name in (SPEC_FILE, weights):
        digest.update(name.encode())
        with open(Path(directory) / name, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
