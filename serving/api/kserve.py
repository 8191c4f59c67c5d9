"""`inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2) over the data plane.

Thin by design: decode with `codec`, call `DataPlane`, encode. The module-level functions build
the protocol's answers as protobuf messages; the REST API (`serving.api.rest`) sends the same ones
as JSON, so the two protocols cannot drift apart. The inference RPCs (`KServeInference`) run
wherever requests are parsed, the front-end processes included; the others (`KServeServicer`)
run where the models are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
import numpy as np

from core import __version__
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc
from protos import model_config_pb2 as mc
from serving.api import codec
from serving.api.codec import InferOptions
from serving.api.rpc import concurrently, grpc_errors, remaining_s
from serving.config import ModelConfig
from serving.engine.control import ModelControl
from serving.engine.preprocess import ACCEPTED_FORMATS
from serving.engine.service import DataPlane, InferencePlane, InferInput, LoadedModel, ServedModel
from serving.engine.shm import Region, RegionInfo, SharedMemoryRegistry, ShmRef
from serving.engine.stats import Duration
from serving.errors import InvalidArgument, ModelNotFound

EXTENSIONS = (
    "classification",
    "schedule_policy",
    "model_configuration",
    "statistics",
    "parameters",
    "binary_tensor_data",
    "trace",
    "system_shared_memory",
)
# What the metadata and config say the tensors accept besides their FP32 form.
FORMATS = ",".join(ACCEPTED_FORMATS)
INPUT_PARAMETERS = {
    "datatypes": "FP32,FP16,UINT8,BYTES",
    "uint8_content": "pixels [-1, 3, S, S] or [-1, S, S, 3], normalized on the server (mean/std)",
    "bytes_shape": "[-1]",
    "bytes_content": f"one encoded image per element ({FORMATS}), decoded and preprocessed on the server",
}
OUTPUT_PARAMETERS = {
    "datatypes": "FP32,BYTES",
    "bytes_content": "with the output parameter classification=k: [-1, k] 'score:index:label', best first",
}


class KServeInference:
    """ModelInfer and ModelStreamInfer over any inference plane, reading shared memory from `regions`."""

    def __init__(self, plane: InferencePlane, regions: SharedMemoryRegistry) -> None:
        self.plane = plane
        self.regions = regions

    @grpc_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        return await self._infer(request, context, "ModelInfer")

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, api: str
    ) -> pb.ModelInferResponse:
        model = self.plane.get(request.model_name, request.model_version)
        tracing = self.plane.tracing
        with tracing.request(context.invocation_metadata, model.name, model.version, api):
            with tracing.span("receive"):
                payload, options = receive(model, request, self.regions)
                output = self._output_region(options.output_region, model, payload.rows)
            tracing.annotate("hrnet.request_id", request.id)
            # A stream's requests are not bound by the call's deadline: each has its own timeout.
            timeout_s = remaining_s(context, options.timeout_s) if api == "ModelInfer" else options.timeout_s
            deadline = self.plane.deadline(model, timeout_s)
            logits = await self.plane.infer(model, payload, deadline, options.priority)
            with tracing.span("respond"):
                if output is not None and options.output_region is not None:
                    output.write(options.output_region, logits.astype("<f4", copy=False))
                return respond(request, model, logits, options, in_shared_memory=output is not None)

    def _output_region(self, ref: ShmRef | None, model: ServedModel, rows: int) -> Region | None:
        """The region the logits go to: resolved (held until written) and sized before any work."""
        if ref is None:
            return None
        what = f"output {model.output.name!r}"
        region = self.regions.resolve(ref, what)
        needed = rows * len(model.labels) * np.dtype(np.float32).itemsize
        if ref.byte_size < needed:
            raise InvalidArgument(
                f"{what}: shared_memory_byte_size {ref.byte_size} is too small for the {needed} bytes "
                f"of {rows} x {len(model.labels)} FP32 logits"
            )
        return region

    @grpc_errors
    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def handle(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            infer_response = await self._infer(request, context, "ModelStreamInfer")
            return pb.ModelStreamInferResponse(infer_response=infer_response)

        def error_response(
            request: pb.ModelInferRequest, code: grpc.StatusCode, message: str
        ) -> pb.ModelStreamInferResponse:
            echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            return pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=echo)

        async for response in concurrently(requests, handle, error_response):
            yield response


class KServeServicer(KServeInference, grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every RPC; `regions_changed` tells the front-end processes when the registry changed."""

    def __init__(
        self,
        plane: DataPlane,
        control: ModelControl,
        regions: SharedMemoryRegistry,
        regions_changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(plane, regions)
        self.plane: DataPlane = plane
        self.control = control
        self._regions_changed = regions_changed

    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext):
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext):
        return pb.ServerReadyResponse(ready=self.plane.ready)

    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext):
        ready = model_ready(self.plane, self.control, request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @grpc_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext):
        return server_metadata()

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext):
        return model_metadata(self.plane, self.plane.get(request.name, request.version))

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext):
        return pb.ModelConfigResponse(config=model_config(self.plane.get(request.name, request.version)))

    @grpc_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext):
        return statistics(self.plane, request.name, request.version)

    @grpc_errors
    async def TraceSetting(self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext):
        changes = {key: list(value.value) for key, value in request.settings.items()}
        settings = trace_setting(self.plane, request.model_name, changes)
        value = pb.TraceSettingResponse.SettingValue
        return pb.TraceSettingResponse(settings={k: value(value=v) for k, v in settings.items()})

    @grpc_errors
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ):
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(
            regions={
                r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
                for r in self.regions.status(request.name)
            }
        )

    @grpc_errors
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ):
        self.regions.register(RegionInfo(request.name, request.key, request.offset, request.byte_size))
        if self._regions_changed:
            await self._regions_changed()
        return pb.SystemSharedMemoryRegisterResponse()

    @grpc_errors
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ):
        self.regions.unregister(request.name)
        if self._regions_changed:
            await self._regions_changed()
        return pb.SystemSharedMemoryUnregisterResponse()

    @grpc_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext):
        entries = await self.control.index(ready_only=request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(name=e.name, version=e.version, state=e.state, reason=e.reason) for e in entries]
        )

    @grpc_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ):
        check_load_parameters(request.parameters)
        await self.control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ):
        check_unload_parameters(request.parameters)
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def receive(
    model: ServedModel, request: pb.ModelInferRequest, regions: SharedMemoryRegistry | None = None
) -> tuple[InferInput, InferOptions]:
    """A request as the data plane takes it: the payload (read from shared memory with `regions`)
    and the options (timeout, priority, k, the output's region)."""
    options = codec.decode_options(request, model.output.name)
    return codec.decode_infer_request(request, model.input.name, regions), options


def respond(
    request: pb.ModelInferRequest,
    model: ServedModel,
    logits: np.ndarray,
    options: InferOptions,
    in_shared_memory: bool = False,
) -> pb.ModelInferResponse:
    k = options.classification_k
    return codec.encode_infer_response(
        request, model.version, model.output.name, logits, k, model.labels, in_shared_memory
    )


def check_load_parameters(parameters: Mapping[str, Any]) -> None:
    """Triton's `config` and `file:` overrides are refused: a model loads from its folder as it is."""
    if parameters:
        raise InvalidArgument(
            f"load parameters {sorted(parameters)[:5]} are not supported: a model is loaded from its "
            "folder in the repository as it is"
        )


def check_unload_parameters(parameters: Mapping[str, Any]) -> None:
    unknown = sorted(set(parameters) - {"unload_dependents"})  # no ensembles: nothing depends on a model
    if unknown:
        raise InvalidArgument(f"unknown unload parameters {unknown[:5]}; known: unload_dependents")


def model_ready(plane: DataPlane, control: ModelControl, name: str, version: str = "") -> bool:
    """False for a model of the repository that is not served (failed, unloaded, never loaded);
    NOT_FOUND for a name the repository does not hold: a typo, not a state."""
    ready = plane.model_ready(name, version)
    if not ready and name and not control.knows(name):
        raise ModelNotFound(name, known=plane.names())
    return ready


def server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name="hrnet", version=__version__, extensions=EXTENSIONS)


def _strings(values: dict[str, str]) -> dict[str, pb.InferParameter]:
    return {k: pb.InferParameter(string_param=v) for k, v in values.items()}


def model_metadata(plane: DataPlane, model: LoadedModel) -> pb.ModelMetadataResponse:
    """Triton's answer, plus per tensor what else it takes: the image input also accepts FP16 and
    encoded images as BYTES; the output comes as BYTES with the classification parameter."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    image = tensor(
        name=model.backend.input.name,
        datatype="FP32",
        shape=[-1, *model.input_shape],
        parameters=_strings(INPUT_PARAMETERS),
    )
    logits = tensor(
        name=model.backend.output.name,
        datatype="FP32",
        shape=[-1, model.num_classes],
        parameters=_strings(OUTPUT_PARAMETERS),
    )
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=plane.versions(model.name),
        platform=model.backend.platform,
        inputs=[image],
        outputs=[logits],
    )


def statistics(plane: DataPlane, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
    """One model's (a version, or the newest) or, without a name, every model's statistics."""
    models = [plane.get(name, version)] if name else plane.models
    return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])


def trace_setting(plane: DataPlane, model_name: str, changes: dict[str, list[str]]) -> dict[str, list[str]]:
    """Triton's TraceSetting: the effective settings after `changes` (none: just read them)."""
    name = plane.get(model_name).name if model_name else ""
    tracing = plane.tracing
    setting = tracing.update(changes, name) if changes else tracing.setting(name)
    return setting.as_triton()


def model_config(model: LoadedModel) -> mc.ModelConfig:
    """Triton's ModelConfig; what has no field of its own goes into `parameters`, among them the
    runtime's effective providers and options as it reported them at load."""
    cfg = model.source.config
    batching = cfg.batching
    meta = model.metadata
    params = {
        "input_size": meta.input_size,
        "resize_size": meta.resize_size,
        "mean": ",".join(f"{x:g}" for x in meta.mean),
        "std": ",".join(f"{x:g}" for x in meta.std),
        "arch": meta.arch,
        "precision": model.precision,
        "labels": ",".join(meta.labels),
        "threads_per_instance": cfg.intra_op_threads(),
        "spin": cfg.spin,
        "adaptive_delay": batching.adaptive_delay,
        **{f"input_{key}": value for key, value in INPUT_PARAMETERS.items()},
        **{f"output_{key}": value for key, value in OUTPUT_PARAMETERS.items()},
        "batch_buckets": ",".join(map(str, batching.buckets())),
        "padding": bool(cfg.padded_buckets()),
        "execution_timeout_s": f"{cfg.execution_timeout_s:g}",
        "warmup_seconds": f"{model.warmup_s:.3f}",
        **model.runtime,
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
        instance_group=instance_groups(model.name, cfg),
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


def instance_groups(name: str, cfg: ModelConfig) -> list[mc.ModelInstanceGroup]:
    """One group on cpu; on an accelerator one per device, as Triton counts them (per GPU)."""
    if cfg.device == "cpu":
        return [mc.ModelInstanceGroup(name=name, kind=mc.ModelInstanceGroup.KIND_CPU, count=cfg.instances)]
    per_device = Counter(cfg.device_id(i) for i in range(cfg.instances))
    return [
        mc.ModelInstanceGroup(
            name=f"{name}_{device}", kind=mc.ModelInstanceGroup.KIND_GPU, count=n, gpus=[device]
        )
        for device, n in sorted(per_device.items())
    ]


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
