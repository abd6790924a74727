"""The registered PSAT ensemble as an MLflow pyfunc model, from code.

MLflow stores this file with every registered version, beside the ``psat_core`` it imports
(the version's ``code/``), and runs it to rebuild the model (``mlflow.pyfunc.load_model``,
``mlflow models serve``): psat need not be installed. Its contract:

* ``model_config``: ``members`` (names, in order), ``strategy``, ``input_shape`` ``[C, H, W]``
  and each member's sha256 ``digests``; artifacts ``member_<name>``: ``member.json`` and
  ``weights.safetensors`` (versions registered by psat 0.1: ``state.pt``).
* input: float32 ``N x C x H x W`` pixels in [0, 1] (JSON: ``{"inputs": [[[[...]]]]}``);
  optional param ``strategy``: ``"lowest_entropy"`` (eq. 12) or ``"average"`` (Table 4).
* output: one row per image: ``class`` (int64), ``probability`` (float64) and ``member`` (the
  member that answered, e.g. ``"linf"``).
"""

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException

from psat_core.checkpoint import checkpoint_digest, ensemble_from_checkpoints
from psat_core.ensemble import STRATEGIES, PSATEnsemble


class PSATModel(mlflow.pyfunc.PythonModel):
    """Verifies the members' digests, rebuilds the ensemble (on the GPU if there is one) and
    answers as the module docstring says."""

    def load_context(self, context) -> None:
        config = context.model_config
        dirs = {name: context.artifacts[f"member_{name}"] for name in config["members"]}
        for name, directory in dirs.items():
            if checkpoint_digest(directory) != config["digests"][name]:
                raise ValueError(
                    f"member {name!r} at {directory} does not match the digest recorded at "
                    "registration; the model's artifacts are damaged or were replaced"
                )
        ensemble = ensemble_from_checkpoints(dirs, config["strategy"])
        self.serve(ensemble, tuple(config["input_shape"]))

    def serve(self, ensemble: PSATEnsemble, shape: tuple[int, int, int]) -> None:
        """Answer with `ensemble` (moved to the GPU when there is one) on images of `shape`."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.ensemble = ensemble.to(self.device)
        self.input_shape = shape

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):
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
        return pd.DataFrame(self.ensemble.predict(images.to(self.device), strategy))


mlflow.models.set_model(PSATModel())
