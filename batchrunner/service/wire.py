"""The embedded service's other protocols: the same text models behind the routes of
KServe v1, the Open Inference Protocol v2, MLflow's scoring server and a custom JSON body.

Routes (each answers errors in its server's own documented shape):

    POST /v2/models/{name}/infer     OIP v2: one [N, F] tensor (the model's features in
                                     order) or one [N] tensor per feature; outputs are the
                                     result's fields that are not inputs, each [N]
    GET  /v2/models/{name}           OIP v2 metadata: inputs (name, datatype, shape), outputs
    POST /v1/models/{name}:predict   KServe v1: {"instances": [...]} -> {"predictions": [...]}
    GET  /v1/models/{name}           KServe v1: {"name": ..., "ready": true}
    POST /invocations                MLflow: dataframe_split or dataframe_records
    GET  /ping                       MLflow: 200 when the model is loaded
    POST /predict/{name}             custom JSON: {"input": <record, text or list of them>}
                                     -> {"result": <result, or list of results>}

Errors: ``{"error": "..."}`` with 400 (KServe v1/v2, MLServer, Triton), 404 for an unknown
model; MLflow's ``{"error_code": "BAD_REQUEST", "message": "..."}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from batchrunner.service.models import ModelInputError, TextModel

#: The inference path of each protocol, for a model called {name}.
PATHS = {
    "kserve-v1": "/v1/models/{name}:predict",
    "oip-v2": "/v2/models/{name}/infer",
    "mlflow": "/invocations",
    "json": "/predict/{name}",
    # The OpenAI-compatible routes (see ``llm``): the model goes in the body, not the path.
    "openai-chat": "/v1/chat/completions",
    "openai-embeddings": "/v1/embeddings",
    "openai-batch": "/v1",
}

Rows = Callable[[list[dict[str, Any]]], None]


class Refused(Exception):
    """A request refused with ``status``; ``param`` names the field at fault, where the
    protocol says (OpenAI's errors)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def add_routes(app: web.Application, model: TextModel, count: Rows) -> None:
    """Add every protocol's routes for ``model``; ``count`` is told of each scored batch."""
    name = model.name

    def scored(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = model.predict(records)
        count(records)
        return results

    def guarded(render: Callable[[int, str], web.Response], handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            given = request.match_info.get("name")
            if given is not None and given != name:
                return render(404, f"Model {given} not found")
            try:
                return await handler(request)
            except Refused as exc:
                return render(exc.status, exc.message)
            except ModelInputError as exc:
                return render(400, str(exc))

        return handle

    async def oip_infer(request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        records, fed = _oip_records(body, model)
        results = scored(records)
        outputs = _oip_outputs(results, fed, body.get("outputs"))
        answer: dict[str, Any] = {
            "model_name": name,
            "id": body.get("id"),
            "parameters": {},
            "outputs": outputs,
        }
        return _json(200, answer)

    async def oip_metadata(request: web.Request) -> web.StreamResponse:
        inputs = []
        if model.features is not None:
            datatype = "BYTES" if model.features == ("text",) else "FP64"
            inputs = [{"name": "input-0", "datatype": datatype, "shape": [-1, len(model.features)]}]
        return _json(
            200, {"name": name, "versions": [], "platform": "batchrunner", "inputs": inputs}
        )

    async def kserve_predict(request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        instances = body.get("instances")
        if not isinstance(instances, list) or not instances:
            raise Refused(400, "Expected 'instances' to be a non-empty list")
        records = [_record(instance, model, "instances", i) for i, instance in enumerate(instances)]
        return _json(200, {"predictions": _predictions(scored(records), records)})

    async def kserve_model(request: web.Request) -> web.StreamResponse:
        return _json(200, {"name": name, "ready": True})

    async def mlflow_invocations(request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        if "dataframe_split" in body:
            frame = body["dataframe_split"]
            columns = frame.get("columns") if isinstance(frame, dict) else None
            data = frame.get("data") if isinstance(frame, dict) else None
            if not isinstance(columns, list) or not isinstance(data, list):
                raise Refused(400, "dataframe_split needs 'columns' and 'data' lists")
            records = []
            for row in data:
                if not isinstance(row, list) or len(row) != len(columns):
                    raise Refused(400, "each dataframe_split row needs one value per column")
                records.append(dict(zip(columns, row, strict=True)))
        elif isinstance(body.get("dataframe_records"), list):
            records = body["dataframe_records"]
        else:
            raise Refused(
                400,
                "The input must be a JSON dictionary with exactly one of the input fields "
                "{'dataframe_split', 'dataframe_records', 'instances', 'inputs'}",
            )
        return _json(200, {"predictions": _predictions(scored(records), records)})

    async def ping(request: web.Request) -> web.StreamResponse:
        return web.Response(text="\n", content_type="application/json")

    async def custom(request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        if "input" not in body:
            raise Refused(400, "the body needs an 'input': a record, a text, or a list")
        given = body["input"]
        if isinstance(given, list):
            records = [_record(item, model, "input", i) for i, item in enumerate(given)]
            return _json(200, {"result": scored(records)})
        return _json(200, {"result": scored([_record(given, model, "input", 0)])[0]})

    oip = guarded(_error_json, oip_infer)
    app.router.add_post("/v2/models/{name}/infer", oip)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", oip)
    app.router.add_get("/v2/models/{name}", guarded(_error_json, oip_metadata))
    app.router.add_post("/v1/models/{name:[^/:]+}:predict", guarded(_error_json, kserve_predict))
    app.router.add_get("/v1/models/{name:[^/:]+}", guarded(_error_json, kserve_model))
    app.router.add_post("/invocations", guarded(_error_mlflow, mlflow_invocations))
    app.router.add_get("/ping", ping)
    app.router.add_post("/predict/{name}", guarded(_error_json, custom))


def _json(status: int, document: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(document), content_type="application/json")


def _error_json(status: int, message: str) -> web.Response:
    return _json(status, {"error": message})


def _error_mlflow(status: int, message: str) -> web.Response:
    code = "BAD_REQUEST" if status == 400 else "RESOURCE_DOES_NOT_EXIST"
    return _json(status, {"error_code": code, "message": message})


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's body, a JSON object, or ``Refused`` (400)."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise Refused(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    return body


def _record(value: Any, model: TextModel, where: str, index: int) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    features = model.features
    if isinstance(value, str) and features == ("text",):
        return {"text": value}
    if isinstance(value, list):
        names = features or tuple(f"f{i}" for i in range(len(value)))
        if len(value) != len(names):
            raise Refused(
                400, f"{where}[{index}] has {len(value)} values for {len(names)} features"
            )
        return dict(zip(names, value, strict=True))
    raise Refused(400, f"{where}[{index}] must be a list of values or an object")


def _predictions(results: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[Any]:
    """One prediction per record: its result's one new field as a scalar, else an object."""
    fresh = [{k: v for k, v in r.items() if k not in records[i]} for i, r in enumerate(results)]
    if all(len(result) == 1 for result in fresh):
        return [next(iter(result.values())) for result in fresh]
    return fresh


def _oip_records(body: dict[str, Any], model: TextModel) -> tuple[list[dict[str, Any]], set[str]]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise Refused(400, "'inputs' must be a non-empty list of tensors")
    columns: dict[str, list[Any]] = {}
    rows = None
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise Refused(400, "each input must be a tensor object")
        name, shape, data = tensor.get("name"), tensor.get("shape"), tensor.get("data")
        if not isinstance(name, str) or not isinstance(shape, list) or not isinstance(data, list):
            raise Refused(400, "each input needs a name, a shape and data")
        if not shape or not all(type(s) is int and s >= 0 for s in shape):
            raise Refused(400, f"input {name!r}: invalid shape {shape}")
        flat = _flatten(data)
        if len(flat) != math.prod(shape):
            raise Refused(400, f"input {name!r}: {len(flat)} values do not fill its shape {shape}")
        if rows is not None and shape[0] != rows:
            raise Refused(400, f"input {name!r} has {shape[0]} rows, others {rows}")
        rows = shape[0]
        if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1 and len(inputs) > 1):
            columns[name] = flat
            continue
        width = math.prod(shape[1:])
        names = model.features or tuple(f"f{i}" for i in range(width))
        if len(names) != width:
            raise Refused(
                400, f"input {name!r} has {width} features; model {model.name} takes {len(names)}"
            )
        for position, feature in enumerate(names):
            columns[feature] = flat[position::width]
    assert rows is not None
    fed = set(columns)
    records = [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]
    return records, fed


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def _oip_outputs(
    results: list[dict[str, Any]], fed: set[str], requested: Any
) -> list[dict[str, Any]]:
    names = [name for name in (results[0] if results else {}) if name not in fed]
    if requested is not None:
        wanted = [o.get("name") for o in requested if isinstance(o, dict)]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise Refused(400, f"unknown output(s) {unknown}; the model has {names}")
        names = [n for n in names if n in wanted]
    outputs = []
    for name in names:
        data = [result.get(name) for result in results]
        outputs.append(
            {"name": name, "datatype": _datatype(data), "shape": [len(data)], "data": data}
        )
    return outputs


def _datatype(data: list[Any]) -> str:
    kinds = set(map(type, data))
    if kinds <= {bool}:
        return "BOOL"
    if kinds <= {int}:
        return "INT64"
    if kinds <= {int, float}:
        return "FP64"
    return "BYTES"
