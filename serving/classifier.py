"""`hrnet.v1.Classifier`: encoded images (or a tensor) in, labelled classes out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc
from serving import codec
from serving.rpc import concurrently, grpc_errors, remaining_s, status_of
from serving.service import DataPlane


class ClassifierServicer(classifier_pb2_grpc.ClassifierServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @grpc_errors
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._classify(request, remaining_s(context, None))

    async def _classify(self, request: pb.ClassifyRequest, timeout_s: float | None) -> pb.ClassifyResponse:
        model = self.plane.get(request.model_name, request.model_version)
        payload = codec.decode_classify_request(request)
        deadline = self.plane.deadline(model, timeout_s)
        logits = await self.plane.infer(model, payload, deadline)
        return codec.encode_classify_response(request, model.name, model.version, logits, model.labels)

    @grpc_errors
    async def ClassifyStream(
        self, requests: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        async def handle(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
            try:
                return await self._classify(request, None)
            except Exception as exc:
                code, message = status_of(exc)
                error = pb.Error(code=code.value[0], message=message)
                return pb.ClassifyResponse(model_name=request.model_name, id=request.id, error=error)

        async for response in concurrently(requests, handle):
            yield response
