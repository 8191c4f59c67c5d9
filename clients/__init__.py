"""Python client for the hrnet gRPC server.

Needs only grpcio, protobuf, numpy and pillow (`pip install hrnet`): no MindSpore, no onnxruntime.
`Client` blocks, `AsyncClient` is its asyncio twin; both raise `ClientError` on any failure.
"""

from clients.aio import AsyncClient
from clients.channel import DEFAULT_MAX_MESSAGE_BYTES, TlsConfig
from clients.client import Client
from clients.errors import ClientError
from clients.results import (
    Classification,
    Health,
    InferResult,
    ModelInfo,
    Prediction,
    StreamResult,
    TensorSpec,
)
from clients.retry import RetryPolicy

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AsyncClient",
    "Classification",
    "Client",
    "ClientError",
    "Health",
    "InferResult",
    "ModelInfo",
    "Prediction",
    "RetryPolicy",
    "StreamResult",
    "TensorSpec",
    "TlsConfig",
]
