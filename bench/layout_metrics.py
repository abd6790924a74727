"""The layout's figures for issue 36: modules one `psat run` touches, the longest functions,
and the modules an orchestrator job imports transitively.

    python bench/layout_metrics.py [--root DIR]   # DIR: a checkout (default: this one)

Modules touched by one `psat run`: the psat modules loaded in a fresh interpreter after
importing what `psat run` runs (its CLI, and the job modules it calls), counted per package.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
import orchestrator.cli as cli
import importlib
# what `psat run` calls: the training job, the Ray Train loop its workers run, the aggregation
for m in ("orchestrator.aggregate", "orchestrator.train_members", "orchestrator.training",
          "orchestrator.training.trainer", "orchestrator.trainers"):
    try:
        importlib.import_module(m)
    except ImportError:
        pass  # a module of the other layout
ours = ("orchestrator", "psat_core")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ours)))
"""


def long_functions(root: Path, least: int = 50) -> list[tuple[int, str]]:
    found = []
    for path in sorted([*root.glob("orchestrator/**/*.py"), *root.glob("psat_core/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > least:
                    found.append((lines, f"{path.relative_to(root)}:{node.name}"))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    root = parser.parse_args().root.resolve()
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", PROBE], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    )
    files = {
        p: [f for f in loaded if f.split(".")[0] == p and f != p]
        for p in ("orchestrator", "psat_core")
    }
    count = {p: len(list((root / p).rglob("*.py"))) for p in files}
    for package, modules in files.items():
        print(f"{package}: {len(modules)} of {count[package]} modules loaded by `psat run`")
    flat = [p.name for p in (root / "orchestrator").glob("*.py")]
    folders = sorted(p.parent.name for p in (root / "orchestrator").glob("*/__init__.py"))
    print(f"orchestrator/ top level: {len(flat)} modules; folders: {folders}")
    print("functions over 50 lines:")
    for lines, name in long_functions(root):
        print(f"  {lines:4d}  {name}")


if __name__ == "__main__":
    main()
