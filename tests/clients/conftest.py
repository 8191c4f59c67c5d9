"""Client-test plumbing: an ONNX-only model repository, certificates, and both clients behind one face.

The shared fixtures in tests/conftest.py provide the model repository, images and a running
server; what is here is specific to the client tests.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clients import AsyncClient, Client


@pytest.fixture(scope="session")
def onnx_repo(model_repo: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the ONNX model: servers the client tests start and restart load in well under a second."""
    root = tmp_path_factory.mktemp("onnx_repo")
    (root / "hrnet" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, root / "hrnet" / "1" / "model.onnx")
    return root


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing this server presents


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _make_ca(folder: Path, name: str) -> None:
    subject = ("-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem")
    _openssl(folder, "req", "-x509", *EC_KEY, "-days", "1", *subject)


def _make_leaf(folder: Path, name: str, ca: str, extension: str) -> None:
    _openssl(folder, "req", *EC_KEY, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
    (folder / f"{name}.ext").write_text(extension + "\n")
    signer = ("-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", *signer, "-days", "1", "-out", f"{name}.pem",
             "-extfile", f"{name}.ext")  # fmt: skip


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("certs")
    _make_ca(folder, "ca")
    _make_ca(folder, "other_ca")
    _make_leaf(folder, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    _make_leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth")
    return Certs(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
        folder / "other_ca.pem",
    )


class BlockingView:
    """An AsyncClient driven from synchronous test code, through its own event loop thread.

    Lets one test body check both clients: coroutines are awaited on the loop, async iterators
    are drained there into an iterator.
    """

    def __init__(self, factory: Callable[[], AsyncClient]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-client", daemon=True)
        self._thread.start()
        self._client = self._run(self._enter(factory))

    @staticmethod
    async def _enter(factory: Callable[[], AsyncClient]) -> AsyncClient:
        return await factory().__aenter__()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(120)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if inspect.isasyncgen(result):
                return iter(self._run(_drain(result)))
            return self._run(result) if inspect.iscoroutine(result) else result

        return call

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _drain(items: Any) -> list[Any]:
    return [item async for item in items]


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """connect(address, **options) -> a Client, or an AsyncClient behind a BlockingView."""
    opened: list[Any] = []

    def make(address: str, **options: Any) -> Any:
        if request.param == "sync":
            client: Any = Client(address, **options)
        else:
            client = BlockingView(lambda: AsyncClient(address, **options))
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()
