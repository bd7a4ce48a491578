"""Engines that require mutual TLS (`--tls-cert --tls-key --tls-client-ca`): the router presenting its
certificate (`--worker-tls-*`) is served, through pd too (engine-to-engine KV pushed over mutual TLS
with each engine's own certificate); a client without a certificate, or with one of another CA, is
refused in the TLS handshake and never reaches a route; a router without a certificate gets no answer."""

from __future__ import annotations

import ssl
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import trustme

from microserve.http.tls import client_context
from microserve.processes import ManagedProcess, free_port
from microserve.router.app import RouterServer
from microserve.router.config import RouterConfig
from microserve.router.router import Router
from microserve.router.workers import WorkerKind, WorkerSpec

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
TOKEN = "test-internal-token"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                        "temperature": 0}  # fmt: skip


class Certs:
    def __init__(self, directory: Path) -> None:
        ca, rogue = trustme.CA(), trustme.CA()
        self.ca = directory / "ca.pem"
        ca.cert_pem.write_to_path(self.ca)
        self.engine = self._issue(ca, directory, "engine", "127.0.0.1", "localhost")
        self.router = self._issue(ca, directory, "router", "router.internal")
        self.rogue = self._issue(rogue, directory, "rogue", "router.internal")

    @staticmethod
    def _issue(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> tuple[Path, Path]:
        issued = ca.issue_cert(*hosts)
        cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("mtls"))


def start_tls_engine(certs: Certs) -> ManagedProcess:
    port = free_port()
    cert, key = certs.engine
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
           "--max-model-len", "4096", "--kv-cache-memory", "256MiB", "--port", str(port), "--threads", "1",
           "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(certs.ca)]  # fmt: skip
    engine = ManagedProcess(cmd, f"https://127.0.0.1:{port}", env={"MICROSERVE_INTERNAL_TOKEN": TOKEN})
    engine.ssl_context = client_context(certs.ca, *certs.router)
    try:
        engine.wait_ready(timeout=180)
    except BaseException:
        engine.stop()
        raise
    return engine


@pytest.fixture(scope="module")
def engines(certs: Certs) -> Iterator[list[ManagedProcess]]:
    started: list[ManagedProcess] = []
    try:
        for _ in range(2):
            started.append(start_tls_engine(certs))
        yield started
    finally:
        for engine in started:
            engine.stop()


@asynccontextmanager
async def router(
    engines: list[ManagedProcess], strategy: str, **tls: Any
) -> AsyncIterator[openai.AsyncOpenAI]:
    workers = [WorkerSpec(e.url, kind=WorkerKind.MICROSERVE) for e in engines]
    config = RouterConfig(workers=workers, strategy=strategy, internal_token=TOKEN, **tls)
    async with RouterServer(Router(config)) as server:
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        try:
            yield sdk
        finally:
            await sdk.close()


@pytest.mark.parametrize("strategy", ["data_parallel", "pd"])
async def test_the_router_with_its_certificate_is_served(
    engines: list[ManagedProcess], certs: Certs, strategy: str
) -> None:
    cert, key = certs.router
    tls = {"worker_tls_ca": str(certs.ca), "worker_tls_cert": str(cert), "worker_tls_key": str(key)}
    async with router(engines, strategy, **tls) as sdk:
        answer = await sdk.chat.completions.create(**CHAT)
        assert answer.usage is not None and answer.usage.completion_tokens == 4


def fetch_ready(url: str, context: ssl.SSLContext) -> int:
    with urllib.request.urlopen(f"{url}/ready", timeout=10, context=context) as resp:
        return int(resp.status)


def test_clients_without_a_certificate_of_the_ca_are_refused_in_the_handshake(
    engines: list[ManagedProcess], certs: Certs
) -> None:
    url = engines[0].url
    assert fetch_ready(url, client_context(certs.ca, *certs.router)) == 200
    for context in (client_context(certs.ca), client_context(certs.ca, *certs.rogue)):
        with pytest.raises(OSError) as refused:  # an SSL alert or a reset: no HTTP answer at all
            fetch_ready(url, context)
        assert not isinstance(refused.value, urllib.error.HTTPError)
    with pytest.raises(OSError):  # plain HTTP on the TLS port: nothing
        fetch_ready(url.replace("https://", "http://"), ssl.create_default_context())


async def test_a_router_without_a_certificate_gets_no_answer(
    engines: list[ManagedProcess], certs: Certs
) -> None:
    async with router(engines[:1], "data_parallel", worker_tls_ca=str(certs.ca)) as sdk:
        with pytest.raises(openai.APIStatusError) as failed:
            await sdk.chat.completions.create(**CHAT)
        assert failed.value.status_code in (502, 503)


def test_half_given_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="go together"):
        RouterConfig(worker_tls_cert="cert.pem")
