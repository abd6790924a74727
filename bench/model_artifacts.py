"""What a registered version stores: per member, the training checkpoint that psat 0.1
registered (state.pt: weights, optimizer moments, scheduler, RNG; a pickle) against the
weights it registers now (weights.safetensors: the model's tensors alone), the code the
version carries (psat_core) and the whole version.

    python bench/model_artifacts.py --tracking-uri sqlite:///mlflow.db \
        --model models:/psat-digits@champion

The members' training checkpoints are the aggregate run's `member.<norm>` params.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from orchestrator.config.locations import checkpoint_location
from orchestrator.registry.pull import resolve
from orchestrator.runtime.tracking import MEMBERS_TAG
from psat_core.checkpoint import STATE_FILE, WEIGHTS_FILE


def size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model", required=True, help="models:/<name>@<alias> or /<version>")
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    version = resolve(args.model, MlflowClient())
    params = MlflowClient().get_run(version.run_id).data.params
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"models:/{version.name}/{version.version}"
        stored = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        print(f"{uri} (run {version.run_id})")
        print(f"{'member':<8}{'state.pt (0.1)':>16}{'weights.safetensors':>21}{'ratio':>8}")
        before = after = 0
        for name in version.tags[MEMBERS_TAG].split(","):
            trained = Path(checkpoint_location(params[f"member.{name}"], "")) / STATE_FILE
            weights = stored / "artifacts" / f"member_{name}" / WEIGHTS_FILE
            before, after = before + size(trained), after + size(weights)
            ratio = size(trained) / size(weights)
            print(f"{name:<8}{size(trained):>16,}{size(weights):>21,}{ratio:>7.2f}x")
        print(f"{'members':<8}{before:>16,}{after:>21,}{before / after:>7.2f}x")
        print(
            f"code/psat_core: {size(stored / 'code'):,} bytes; the whole version: {size(stored):,}"
        )


if __name__ == "__main__":
    main()
