"""`inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2) over the data plane.

Thin by design: decode with `codec`, call `DataPlane`, encode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from core import __version__
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc
from protos import model_config_pb2 as mc
from serving import codec
from serving.rpc import concurrently, grpc_errors, remaining_s, status_of
from serving.service import DataPlane, LoadedModel
from serving.stats import Duration

EXTENSIONS = ("classification", "schedule_policy", "model_configuration", "statistics", "parameters")


class KServeServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext):
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext):
        return pb.ServerReadyResponse(ready=self.plane.ready)

    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext):
        model = self.plane.get(request.name, request.version)
        return pb.ModelReadyResponse(ready=model.ready and self.plane.accepting)

    @grpc_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext):
        return pb.ServerMetadataResponse(name="hrnet", version=__version__, extensions=EXTENSIONS)

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext):
        model = self.plane.get(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=self.plane.versions(model.name),
            platform=model.backend.platform,
            inputs=[tensor(name=model.backend.input.name, datatype="FP32", shape=[-1, *model.input_shape])],
            outputs=[tensor(name=model.backend.output.name, datatype="FP32", shape=[-1, model.num_classes])],
        )

    @grpc_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        return await self._infer(request, context)

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None
    ) -> pb.ModelInferResponse:
        model = self.plane.get(request.model_name, request.model_version)
        options = codec.decode_options(request, model.backend.output.name)
        payload = codec.decode_infer_request(request, model.backend.input.name)
        timeout_s = remaining_s(context, options.timeout_s) if context else options.timeout_s
        deadline = self.plane.deadline(model, timeout_s)
        logits = await self.plane.infer(model, payload, deadline, options.priority)
        return codec.encode_infer_response(
            request,
            model.version,
            model.backend.output.name,
            logits,
            options.classification_k,
            model.labels,
        )

    @grpc_errors
    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def handle(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
            except Exception as exc:
                code, message = status_of(exc)
                echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                return pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}", infer_response=echo
                )

        async for response in concurrently(requests, handle):
            yield response

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext):
        return pb.ModelConfigResponse(config=model_config(self.plane.get(request.name, request.version)))

    @grpc_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext):
        models = [self.plane.get(request.name, request.version)] if request.name else self.plane.models
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])


def model_config(model: LoadedModel) -> mc.ModelConfig:
    cfg = model.source.config
    batching = cfg.batching
    meta = model.metadata
    kind = mc.ModelInstanceGroup.KIND_CPU if cfg.device == "cpu" else mc.ModelInstanceGroup.KIND_GPU
    params = {
        "input_size": meta.input_size,
        "resize_size": meta.resize_size,
        "mean": ",".join(f"{x:g}" for x in meta.mean),
        "std": ",".join(f"{x:g}" for x in meta.std),
        "arch": meta.arch,
        "precision": model.precision,
        "labels": ",".join(meta.labels),
        "threads_per_instance": cfg.intra_op_threads(),
        "adaptive_delay": batching.adaptive_delay,
    }
    return mc.ModelConfig(
        name=model.name,
        platform=model.backend.platform,
        backend=model.backend.name,
        max_batch_size=batching.max_batch_size,
        input=[
            mc.ModelInput(
                name=model.backend.input.name,
                data_type=mc.TYPE_FP32,
                format=mc.ModelInput.FORMAT_NCHW,
                dims=list(model.input_shape),
            )
        ],
        output=[
            mc.ModelOutput(name=model.backend.output.name, data_type=mc.TYPE_FP32, dims=[model.num_classes])
        ],
        instance_group=[mc.ModelInstanceGroup(name=model.name, kind=kind, count=cfg.instances)],
        default_model_filename=model.source.path.name,
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=list(batching.preferred_batch_sizes),
            max_queue_delay_microseconds=batching.max_queue_delay_us,
            default_queue_policy=mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.REJECT,
                default_timeout_microseconds=batching.default_timeout_us,
                allow_timeout_override=True,
                max_queue_size=batching.max_queue_size,
            ),
        ),
        parameters={k: mc.ModelParameter(string_value=str(v)) for k, v in params.items()},
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(model: LoadedModel) -> pb.ModelStatistics:
    s = model.stats.snapshot()
    return pb.ModelStatistics(
        name=model.name,
        version=model.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_infer=_duration(s.compute_infer),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
            for size, d in sorted(s.batches.items())
        ],
    )
