"""HTTPS on the router's own server: the official client over TLS with the test CA, a client that does
not trust the CA refused, a plain-HTTP client answered nothing, and a clear error for a bad key file."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trustme

from microserve.http.tls import server_context
from microserve.processes import ManagedProcess, free_port
from microserve.router.config import RouterConfig
from tests.tenant_fleet import MODEL, gateway, start_engine

CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "secret"}],
    "max_tokens": 3,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate chain, server key) for 127.0.0.1, made now."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    server.private_key_pem.write_to_path(directory / "key.pem")
    server.cert_chain_pems[0].write_to_path(directory / "cert.pem")
    return directory / "ca.pem", directory / "cert.pem", directory / "key.pem"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    yield from start_engine(tmp_path_factory.mktemp("tls-engine"))


@pytest.mark.slow
async def test_the_official_client_over_https(engine: ManagedProcess, certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    async with gateway(engine, api_keys="memory", tls_cert=str(cert), tls_key=str(key)) as client:
        url = client.server.url
        assert url.startswith("https://")
        async with client.post("/admin/keys", json={"tenant": "t"}, ssl=False) as resp:
            assert resp.status == 401  # the admin API is on HTTPS too (here with verification off)
        secret = await new_key_over_tls(url, ca)
        trusted = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca)))
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=secret, http_client=trusted) as sdk:
            answer = await sdk.chat.completions.create(**CHAT)
            assert answer.usage is not None and answer.usage.completion_tokens == 3
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0) as untrusting:
            with pytest.raises(openai.APIConnectionError):
                await untrusting.chat.completions.create(**CHAT)  # the system store lacks the test CA
        plain = url.replace("https://", "http://")
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.HTTPError):
                await http.post(f"{plain}/v1/chat/completions", json=CHAT, timeout=5)


async def new_key_over_tls(url: str, ca: Path) -> str:
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca))) as http:
        resp = await http.post(
            f"{url}/admin/keys", json={"tenant": "t"}, headers={"Authorization": "Bearer admin-secret"}
        )
        assert resp.status_code == 201
        return resp.json()["key"]


def test_bad_tls_files_are_one_clear_error(tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    _, cert, _ = certs
    (tmp_path / "key.pem").write_text("not a key")
    with pytest.raises(OSError, match="cannot load the TLS certificate"):
        server_context(cert, tmp_path / "key.pem")
    with pytest.raises(ValueError, match="go together"):
        RouterConfig(tls_cert=str(cert))
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "microserve", "router", "--port", str(port), "--worker", "http://127.0.0.1:9",
         "--tls-cert", str(cert), "--tls-key", str(tmp_path / "key.pem")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "cannot load the TLS certificate" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
