"""`psat serve`: MLflow's scoring server for a registered ensemble that `pull` verified.

Unlike ``mlflow models serve`` it never runs the code stored with the version: the model is
this installed psat's `psat_model.PSATModel` on the verified weights. And a
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

from orchestrator.registry.psat_model import PSATModel
from orchestrator.registry.pull import PulledModel
from orchestrator.registry.register import signature


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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error_code": "INVALID_PARAMETER_VALUE", "message": message}, status)


def strict_app(model: PyFuncModel, max_body: int, max_rows: int):
    """MLflow's scoring app, answering a request to /invocations that is larger than `max_body`
    bytes with 413 (before reading it), one of more than `max_rows` rows or with params the
    model does not declare with 400."""
    app = scoring_app(model)
    allowed = {param.name for param in model.metadata.get_params_schema().params}

    @app.middleware("http")
    async def bound_and_check(request: Request, call_next):
        if request.method != "POST" or request.url.path != "/invocations":
            return await call_next(request)
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return _error(411, "a request to /invocations needs a Content-Length header")
        if int(length) > max_body:
            return _error(413, f"request body of {int(length):,} bytes; the limit is "
                               f"{max_body:,} (psat serve --max-body-mb)")  # fmt: skip
        request_json = _json_object(await request.body())
        rows = _rows(request_json)
        if rows > max_rows:
            return _error(400, f"{rows} rows in one request; the limit is {max_rows} "
                               "(psat serve --max-rows): send smaller batches")  # fmt: skip
        params = request_json.get("params")
        unknown = sorted(set(params) - allowed) if isinstance(params, dict) else []
        if unknown:
            return _error(400, f"unknown param(s) {unknown}; this model takes {sorted(allowed)}")
        return await call_next(request)

    return app


def _json_object(body: bytes) -> dict:
    """A JSON request body's object (else {}: not JSON, MLflow's parser answers it)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _rows(request_json: dict) -> int:
    """Rows of a scoring request in any of MLflow's JSON formats (0 if none is recognised)."""
    for key in ("inputs", "instances", "dataframe_records"):
        if isinstance(request_json.get(key), list):
            return len(request_json[key])
    split = request_json.get("dataframe_split")
    data = split.get("data") if isinstance(split, dict) else None
    return len(data) if isinstance(data, list) else 0


def listening(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for `serve`; a port in use is a ValueError."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; choose --port") from None
    return sock


def serve(
    pulled: PulledModel, sock: socket.socket, verbose: bool, max_body: int, max_rows: int
) -> None:
    """Serve `pulled` on `sock` (`listening`) until interrupted (`strict_app`'s bounds)."""
    app = strict_app(scoring_model(pulled), max_body, max_rows)
    config = uvicorn.Config(app, log_level="info" if verbose else "warning")
    host, port = sock.getsockname()[:2]
    print(f"serving {pulled.uri} at http://{host}:{port}/invocations", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
