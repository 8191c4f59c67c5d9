"""`hrnet.v1.Classifier`: encoded images (or a tensor) in, labelled classes out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc
from serving.api import codec
from serving.api.rpc import concurrently, grpc_errors, remaining_s
from serving.engine.service import InferencePlane


class ClassifierServicer(classifier_pb2_grpc.ClassifierServicer):
    """Inference RPCs only: runs wherever requests are parsed, front-end processes included."""

    def __init__(self, plane: InferencePlane) -> None:
        self.plane = plane

    @grpc_errors
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._classify(request, context, "Classify")

    async def _classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, api: str
    ) -> pb.ClassifyResponse:
        model = self.plane.get(request.model_name, request.model_version)
        tracing = self.plane.tracing
        with tracing.request(context.invocation_metadata, model.name, model.version, api):
            with tracing.span("receive"):
                payload = codec.decode_classify_request(request)
            tracing.annotate("hrnet.request_id", request.id)
            # A stream's requests are not bound by the call's deadline.
            deadline = self.plane.deadline(model, remaining_s(context, None) if api == "Classify" else None)
            logits = await self.plane.infer(model, payload, deadline)
            with tracing.span("respond"):
                return codec.encode_classify_response(
                    request, model.name, model.version, logits, model.labels
                )

    @grpc_errors
    async def ClassifyStream(
        self, requests: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        async def handle(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
            return await self._classify(request, context, "ClassifyStream")

        def error_response(
            request: pb.ClassifyRequest, code: grpc.StatusCode, message: str
        ) -> pb.ClassifyResponse:
            error = pb.Error(code=code.value[0], message=message)
            return pb.ClassifyResponse(model_name=request.model_name, id=request.id, error=error)

        async for response in concurrently(requests, handle, error_response):
            yield response
