"""`psat serve`: MLflow's scoring server for a registered ensemble that `pull` verified.

Unlike ``mlflow models serve`` it never runs the code stored with the version: the model is
this installed psat's :class:`~orchestrator.psat_model.PSATModel` on the verified weights. And a
request naming a param the signature does not declare is a 400 naming it, where MLflow drops
it with a warning in the server log.
"""

from __future__ import annotations

import json
import socket

import uvicorn
from mlflow.models import Model
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc.model import PythonModelContext, _PythonModelPyfuncWrapper
from mlflow.pyfunc.scoring_server import init as scoring_app
from starlette.requests import Request
from starlette.responses import JSONResponse

from orchestrator.psat_model import PSATModel
from orchestrator.pull import PulledModel
from orchestrator.registry import signature


def scoring_model(pulled: PulledModel) -> PyFuncModel:
    """The pulled ensemble as a pyfunc model with psat's own signature and code."""
    spec = next(iter(pulled.specs.values()))
    shape = spec.input_shape
    python_model = PSATModel()
    python_model.serve(pulled.ensemble, shape)
    meta = Model.load(str(pulled.path))
    meta.signature = signature(shape, pulled.strategy)
    context = PythonModelContext(artifacts={}, model_config={})
    return PyFuncModel(meta, _PythonModelPyfuncWrapper(python_model, context, meta.signature))


def strict_app(model: PyFuncModel):
    """MLflow's scoring app, answering 400 to a JSON request with params it does not declare."""
    app = scoring_app(model)
    allowed = {param.name for param in model.metadata.get_params_schema().params}

    @app.middleware("http")
    async def refuse_unknown_params(request: Request, call_next):
        if request.method == "POST" and request.url.path == "/invocations":
            unknown = _unknown_params(await request.body(), allowed)
            if unknown:
                message = f"unknown param(s) {unknown}; this model takes {sorted(allowed)}"
                return JSONResponse(
                    {"error_code": "INVALID_PARAMETER_VALUE", "message": message}, 400
                )
        return await call_next(request)

    return app


def _unknown_params(body: bytes, allowed: set[str]) -> list[str]:
    """Param names in a JSON request body that the model does not declare (else [])."""
    try:
        params = json.loads(body).get("params")
    except (ValueError, AttributeError):
        return []  # not a JSON object: MLflow's parser answers it
    return sorted(set(params) - allowed) if isinstance(params, dict) else []


def serve(pulled: PulledModel, host: str, port: int, verbose: bool = False) -> None:
    """Serve `pulled` on host:port until interrupted; a port in use is a ValueError."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; choose --port") from None
    app = strict_app(scoring_model(pulled))
    config = uvicorn.Config(app, log_level="info" if verbose else "warning")
    print(f"serving {pulled.uri} at http://{host}:{port}/invocations", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
