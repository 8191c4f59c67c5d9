"""The inference server: backends, dynamic batching, preprocessing, gRPC and REST, health and metrics.

Modules depend one way: the protocol layers (`kserve`, `classifier` for gRPC, `rest` for HTTP)
translate messages and call the data plane (`service`), which feeds the `batcher`, which runs
`backends`.

Run it in-process with `serving.Server(serving.ServerConfig(...))` (see `serving.server`);
both names are imported on first use, so `import serving.preprocess` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.config import ServerConfig
    from serving.server import Server

__all__ = ["Server", "ServerConfig"]


def __getattr__(name: str) -> Any:
    if name == "Server":
        from serving.server import Server

        return Server
    if name == "ServerConfig":
        from serving.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
