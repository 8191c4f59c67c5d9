"""The Open Inference Protocol over HTTP/REST (KServe v2, with Triton's extensions) over the data plane.

Thin by design, like the gRPC servicer: the answers are the same protobuf messages
(`serving.api.kserve` builds them) sent as JSON, requests become the same ModelInferRequest
(`serving.api.rest_codec`), and inference is the same `DataPlane.infer`. Routes, as Triton has them:

    GET  /v2                                        server metadata
    GET  /v2/health/live | /v2/health/ready         200, or 400 when not ready
    GET  /v2/models/stats                           every model's statistics
    GET  /v2/models/{model}[/versions/{version}]    model metadata
    GET  .../ready | .../config | .../stats         readiness (200/400), Triton's config, statistics
    POST .../infer                                  inference (JSON and binary tensors)
    POST /v2/repository/index                       what the repository holds, by state
    POST /v2/repository/models/{model}/load|unload  model control (`serving.engine.control`)
    GET|POST /v2/trace/setting, /v2/models/{model}/trace/setting    trace settings

Errors answer `{"error": "..."}` with the status `serving.api.http` maps their code to.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from serving.api import kserve
from serving.api.http import json_errors
from serving.api.rest_codec import HEADER_LENGTH, decode_infer, encode_infer, to_json
from serving.engine.control import ModelControl
from serving.engine.service import DataPlane, LoadedModel
from serving.errors import InvalidArgument

NOT_READY = 400  # KServe: "a 4xx status code indicates false"; Triton answers 400


class RestApi:
    def __init__(self, plane: DataPlane, control: ModelControl) -> None:
        self.plane = plane
        self.control = control

    def app(self, max_body_bytes: int, middlewares: list[Any]) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes, middlewares=[json_errors, *middlewares])
        get, post = app.router.add_get, app.router.add_post
        get("/v2", self.server_metadata)
        get("/v2/health/live", self.live)
        get("/v2/health/ready", self.ready)
        get("/v2/models/stats", self.all_statistics)  # before /v2/models/{model}, which it would match
        get("/v2/trace/setting", self.trace_setting)
        post("/v2/trace/setting", self.trace_setting)
        post("/v2/repository/index", self.repository_index)
        post("/v2/repository/models/{model}/load", self.load)
        post("/v2/repository/models/{model}/unload", self.unload)
        get("/v2/models/{model}/trace/setting", self.trace_setting)
        post("/v2/models/{model}/trace/setting", self.trace_setting)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            get(base, self.model_metadata)
            get(base + "/ready", self.model_ready)
            get(base + "/config", self.model_config)
            get(base + "/stats", self.model_statistics)
            post(base + "/infer", self.infer)
        return app

    def _model(self, request: web.Request) -> LoadedModel:
        return self.plane.get(request.match_info["model"], request.match_info.get("version", ""))

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        """A small JSON object body; an empty body is {}."""
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"the request is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        return body

    # --- health and metadata -----------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(to_json(kserve.server_metadata()))

    async def live(self, request: web.Request) -> web.Response:
        return web.Response()

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.plane.ready else NOT_READY)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(to_json(kserve.model_metadata(self.plane, self._model(request))))

    async def model_ready(self, request: web.Request) -> web.Response:
        info = request.match_info
        ready = kserve.model_ready(self.plane, self.control, info["model"], info.get("version", ""))
        return web.Response(status=200 if ready else NOT_READY)

    async def model_config(self, request: web.Request) -> web.Response:
        return web.json_response(to_json(kserve.model_config(self._model(request))))

    async def model_statistics(self, request: web.Request) -> web.Response:
        info = request.match_info
        return web.json_response(
            to_json(kserve.statistics(self.plane, info["model"], info.get("version", "")))
        )

    async def all_statistics(self, request: web.Request) -> web.Response:
        return web.json_response(to_json(kserve.statistics(self.plane)))

    # --- inference ---------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        model = self._model(request)  # an unknown model fails before its body is read
        tracing = self.plane.tracing
        with tracing.request(request.headers.items, model.name, model.version, "REST infer"):
            with tracing.span("receive"):
                body = await request.read()
                # Again after the await: a version swapped in meanwhile may have retired this one,
                # and the data plane counts a request from `infer`, which follows with no await.
                model = self._model(request)
                decoded = decode_infer(body, request.headers.get(HEADER_LENGTH), model.name, model.version)
                payload, options = kserve.receive(model, decoded.message)
            tracing.annotate("hrnet.version", model.version)
            tracing.annotate("hrnet.request_id", decoded.message.id)
            deadline = self.plane.deadline(model, options.timeout_s)
            logits = await self.plane.infer(model, payload, deadline, options.priority)
            with tracing.span("respond"):
                answer = kserve.respond(decoded.message, model, logits, options)
                content, json_length = encode_infer(answer, decoded)
        if json_length is None:
            response = web.Response(body=content, content_type="application/json")
        else:
            response = web.Response(
                body=content,
                content_type="application/octet-stream",
                headers={HEADER_LENGTH: str(json_length)},
            )
        if "Accept-Encoding" in request.headers:  # compressed only when asked (tritonclient's option)
            response.enable_compression()
        return response

    # --- model repository --------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        ready_only = (await self._body(request)).get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidArgument(f"'ready' must be a boolean, got {ready_only!r}")
        entries = await self.control.index(ready_only)
        return web.json_response(
            [{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in entries]
        )

    async def load(self, request: web.Request) -> web.Response:
        kserve.check_load_parameters((await self._body(request)).get("parameters") or {})
        await self.control.load(request.match_info["model"])
        return web.Response()

    async def unload(self, request: web.Request) -> web.Response:
        kserve.check_unload_parameters((await self._body(request)).get("parameters") or {})
        await self.control.unload(request.match_info["model"])
        return web.Response()

    # --- trace settings ----------------------------------------------------------------------

    async def trace_setting(self, request: web.Request) -> web.Response:
        changes: dict[str, list[str]] = {}
        if request.method == "POST":
            for key, value in (await self._body(request)).items():
                if value is None:
                    changes[key] = []  # back to the default
                elif isinstance(value, str):
                    changes[key] = [value]
                elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                    changes[key] = value
                else:
                    raise InvalidArgument(f"trace setting {key!r}: give a string, a list of strings or null")
        settings = kserve.trace_setting(self.plane, request.match_info.get("model", ""), changes)
        # As Triton answers: trace_level a list, the others single strings.
        return web.json_response({k: v if k == "trace_level" else v[0] for k, v in settings.items()})
