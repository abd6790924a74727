"""Ray Train's backend for a model trained by a single worker (`trainer`).

Ray's `TorchConfig` starts a torch.distributed process group, which only DDP needs (several
workers per model), and the run's controller actor, which unpickles the config, then imports
torch: about 2.5 s of CPU per model spent on nothing. This module imports neither torch nor
the rest of psat, so a single worker's controller stays torch-free.
"""

from dataclasses import dataclass

from ray.train.backend import BackendConfig


@dataclass
class SingleWorker(BackendConfig):
    """No process group: the one worker trains alone (psat's loop reaches for torch.distributed
    only under DDP). ``backend`` is what `TorchTrainer` reads; no collective backend starts."""

    backend: str = "none"
