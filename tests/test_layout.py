"""The architecture, pinned (in the manner of Ray Train's `test_circular_imports.py`).

- `psat_core` is pure PyTorch: it imports neither Ray, MLflow nor the orchestrator.
- `orchestrator/`'s folders hold what its jobs are built from: a folder never imports a job
  module (the top level of `orchestrator/`), and imports only the folders beneath it in
  `LAYERS`. `jobs/` entrypoints go through the CLI.
- What Ray's actors unpickle, or a refusing process loads, stays free of torch, Ray's
  training stack and MLflow: measured in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the orchestrator folders it may import (a folder always imports itself)
LAYERS = {
    "config": set(),
    "runtime": {"config"},
    "training": {"config", "runtime"},
    "evaluation": {"config", "runtime", "training"},
    "registry": {"config", "runtime"},
}
JOB_MODULES = {p.stem for p in (ROOT / "orchestrator").glob("*.py")} - {"__init__"}


def imported(path: Path) -> list[str]:
    """Every module `path` imports, at any depth (lazy imports inside functions included)."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    return modules


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_layers_cover_every_folder():
    folders = {p.name for p in (ROOT / "orchestrator").iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS)


@pytest.mark.parametrize("path", sources("psat_core"), ids=lambda p: p.name)
def test_psat_core_imports_neither_ray_mlflow_nor_the_orchestrator(path):
    roots = {module.split(".")[0] for module in imported(path)}
    assert not roots & {"ray", "mlflow", "orchestrator", "jobs"}


@pytest.mark.parametrize(
    "path",
    [p for p in sources("orchestrator") if p.parent.name in LAYERS],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_a_folder_imports_only_the_folders_beneath_it(path):
    folder = path.parent.name
    for module in imported(path):
        parts = module.split(".")
        if parts[0] != "orchestrator":
            continue
        assert len(parts) > 1 and parts[1] not in JOB_MODULES, f"{module}: a job module"
        assert parts[1] in LAYERS[folder] | {folder}, f"{module}: not beneath {folder}/"


@pytest.mark.parametrize("path", sources("jobs"), ids=lambda p: p.name)
def test_job_entrypoints_go_through_the_cli(path):
    ours = [m for m in imported(path) if m.split(".")[0] in {"orchestrator", "psat_core"}]
    assert set(ours) <= {"orchestrator.cli"}


# what must load without torch, Ray Train and MLflow: the config (every process validates
# one), the single-worker backend (Ray Train's controller unpickles it) and the progress board
# (its actor imports it), and the CLI up to a refusal
LIGHT = [
    "orchestrator.config",
    "orchestrator.config.locations",
    "orchestrator.training.backend",
    "orchestrator.runtime.progress",
    "orchestrator.runtime.reach",
    "orchestrator.runtime.signals",
    "orchestrator.evaluation.rows",
    "orchestrator.cli",
    "psat_core.settings",
    "psat_core.dataset_files",
]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_stay_free_of_torch_and_mlflow(module):
    probe = (
        f"import json, sys, {module}; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                       text=True, check=True, cwd=ROOT).stdout)  # fmt: skip
    assert not {"torch", "mlflow"} & set(loaded)
    if module not in ("orchestrator.training.backend", "orchestrator.runtime.progress"):
        assert "ray" not in loaded  # those two are Ray's own classes
