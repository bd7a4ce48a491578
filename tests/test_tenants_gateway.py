"""The gateway through the official `openai` client, in front of a real sim engine: keys (missing, wrong,
revoked, model not allowed), requests and tokens per minute with OpenAI's headers, the daily budget,
tokens settled on the real count (whole and streamed answers), the admin API, and no key in the logs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from microserve.processes import ManagedProcess
from tests.tenant_fleet import ADMIN, MODEL, gateway, new_key, sdk, start_engine

pytestmark = pytest.mark.slow
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "temperature": 0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    yield from start_engine(tmp_path_factory.mktemp("tenants"))


async def test_keys_missing_wrong_revoked_and_model_not_allowed(
    engine: ManagedProcess, tmp_path: Path
) -> None:
    async with gateway(engine, api_keys=str(tmp_path / "keys.json")) as client:
        key = await new_key(client, models=[MODEL])
        narrow = await new_key(client, models=["another-model"])
        async with (
            sdk(client, key) as good,
            sdk(client, "sk-ms-wrong") as wrong,
            sdk(client, narrow) as other,
        ):
            answer = await good.chat.completions.create(**CHAT, max_tokens=3)
            assert answer.usage is not None and answer.usage.completion_tokens == 3
            with pytest.raises(openai.AuthenticationError) as refused:
                await wrong.chat.completions.create(**CHAT, max_tokens=3)
            assert refused.value.code == "invalid_api_key"
            with pytest.raises(openai.NotFoundError) as not_allowed:
                await other.chat.completions.create(**CHAT, max_tokens=3)
            assert not_allowed.value.code == "model_not_found"
            assert [m.id async for m in good.models.list()] == [MODEL]
            assert [m.id async for m in other.models.list()] == []  # only the models the key may use
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
            async with client.post("/v1/chat/completions", json=CHAT) as resp:  # no key at all
                assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
            key_id = next(k["id"] for k in await list_keys(client) if k["models"] == [MODEL])
            async with client.delete(f"/admin/keys/{key_id}", headers=ADMIN) as resp:
                assert resp.status == 200
            with pytest.raises(openai.AuthenticationError):
                await good.chat.completions.create(**CHAT, max_tokens=3)


async def list_keys(client) -> list[dict]:
    async with client.get("/admin/keys", headers=ADMIN) as resp:
        assert resp.status == 200
        return (await resp.json())["data"]


async def test_requests_per_minute_with_openai_headers(engine: ManagedProcess) -> None:
    async with gateway(engine, api_keys="memory") as client:
        key = await new_key(client, rpm=2)
        async with sdk(client, key) as api:
            first = await api.chat.completions.with_raw_response.create(**CHAT, max_tokens=2)
            assert first.headers["x-ratelimit-limit-requests"] == "2"
            assert first.headers["x-ratelimit-remaining-requests"] == "1"
            assert first.headers["x-ratelimit-reset-requests"].endswith("s")
            await api.chat.completions.create(**CHAT, max_tokens=2)
            with pytest.raises(openai.RateLimitError) as refused:
                await api.chat.completions.create(**CHAT, max_tokens=2)
        async with client.get("/metrics") as resp:
            assert 'microserve_router_tenant_refusals_total{reason="rpm"} 1.0' in await resp.text()
    err = refused.value
    assert err.code == "rate_limit_exceeded" and err.type == "rate_limit_error"
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(err.response.headers["retry-after"]) <= 60


def spent(headers: object, limit: int) -> int:
    return limit - int(headers["x-ratelimit-remaining-tokens"])  # type: ignore[index]


async def test_tokens_per_minute_settle_on_the_real_count(engine: ManagedProcess) -> None:
    """Two identical requests reserve the same: the second's header shows the first settled."""
    tpm = 5000
    async with gateway(engine, api_keys="memory") as client:
        key = await new_key(client, tpm=tpm)
        async with sdk(client, key) as api:
            with pytest.raises(openai.RateLimitError, match="Request too large"):
                await api.chat.completions.create(**CHAT, max_tokens=6000)
            first = await api.chat.completions.with_raw_response.create(**CHAT, max_tokens=40)
            second = await api.chat.completions.with_raw_response.create(**CHAT, max_tokens=40)
            usage = first.parse().usage
            assert usage is not None and usage.completion_tokens == 40
            assert spent(second.headers, tpm) - spent(first.headers, tpm) == usage.total_tokens

            # A stream is settled on its usage chunk...
            streamed = {**CHAT, "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True}}
            one = await api.chat.completions.with_raw_response.create(**streamed)
            chunks = [c async for c in one.parse()]
            stream_usage = chunks[-1].usage
            assert stream_usage is not None and stream_usage.completion_tokens == 20
            two = await api.chat.completions.with_raw_response.create(**streamed)
            _ = [c async for c in two.parse()]
            assert spent(two.headers, tpm) - spent(one.headers, tpm) == stream_usage.total_tokens

            # ... and a request the engine refused costs nothing: its reservation comes back.
            before = await api.chat.completions.with_raw_response.create(**CHAT, max_tokens=1)
            with pytest.raises(openai.BadRequestError):  # the router leaves sampling ranges to the engine
                await api.chat.completions.create(**{**CHAT, "temperature": 3.0}, max_tokens=1)
            after = await api.chat.completions.with_raw_response.create(**CHAT, max_tokens=1)
            settled = before.parse().usage
            assert settled is not None
            assert spent(after.headers, tpm) - spent(before.headers, tpm) == settled.total_tokens


async def test_daily_budget_refuses_once_spent(engine: ManagedProcess) -> None:
    async with gateway(engine, api_keys="memory") as client:
        key = await new_key(client, daily_tokens=200)
        async with sdk(client, key) as api:
            await api.chat.completions.create(**CHAT, max_tokens=150)  # 150 + the prompt: spent at once
            with pytest.raises(openai.RateLimitError, match="Daily token budget"):
                await api.chat.completions.create(**CHAT, max_tokens=100)


async def test_admin_api_shows_a_secret_once_and_patches_limits(engine: ManagedProcess) -> None:
    async with gateway(engine, api_keys="memory") as client:
        async with client.post("/admin/keys", json={"tenant": "acme"}) as resp:
            assert resp.status == 401
        async with client.post("/admin/keys", json={"tenant": "acme", "rpm": "many"}, headers=ADMIN) as resp:
            assert resp.status == 400 and "rpm" in (await resp.json())["error"]["message"]
        key = await new_key(client, tenant="acme")
        listed = await list_keys(client)
        assert len(listed) == 1 and "key" not in listed[0] and "key_hash" not in listed[0]
        key_id = listed[0]["id"]
        async with client.patch(f"/admin/keys/{key_id}", json={"rpm": 1}, headers=ADMIN) as resp:
            assert resp.status == 200 and (await resp.json())["rpm"] == 1
        async with client.patch("/admin/keys/key_nope", json={"rpm": 1}, headers=ADMIN) as resp:
            assert resp.status == 404
        async with sdk(client, key) as api:
            await api.chat.completions.create(**CHAT, max_tokens=1)
            with pytest.raises(openai.RateLimitError):
                await api.chat.completions.create(**CHAT, max_tokens=1)


async def test_no_key_reaches_the_logs(engine: ManagedProcess, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with gateway(engine, api_keys="memory") as client:
        key = await new_key(client)
        async with sdk(client, key) as api, sdk(client, key + "x") as wrong:
            await api.chat.completions.create(**CHAT, max_tokens=1)
            with pytest.raises(openai.AuthenticationError) as refused:
                await wrong.chat.completions.create(**CHAT, max_tokens=1)
    assert key not in caplog.text and key not in str(refused.value)


async def test_priority_classes_order_the_queue(engine: ManagedProcess) -> None:
    """One slot, held by a long stream: the waiting requests are answered high class first, a header
    raising the class only where the key allows it, and the rest in arrival order."""
    from microserve.router.admission import AdmissionConfig

    async with gateway(engine, api_keys="memory", admission=AdmissionConfig(max_concurrent=1)) as client:
        keys = {
            "holder": await new_key(client, tenant="holder"),
            "low": await new_key(client, tenant="l", priority="low"),
            "ignored": await new_key(client, tenant="i", priority="low"),
            "high": await new_key(client, tenant="h", priority="high"),
            "header": await new_key(client, tenant="x", priority="low", priority_header=True),
        }
        apis = {name: sdk(client, key) for name, key in keys.items()}
        done: list[str] = []

        async def ask(name: str) -> None:
            await apis[name].chat.completions.create(
                **CHAT, max_tokens=2, extra_headers={"x-priority": "high"} if name != "low" else {}
            )
            done.append(name)

        holder = await apis["holder"].chat.completions.create(**CHAT, max_tokens=2000, stream=True)
        await anext(aiter(holder))  # the slot is taken
        tasks = []
        for position, name in enumerate(("low", "ignored", "high", "header"), start=1):
            tasks.append(asyncio.create_task(ask(name)))
            await wait_until(lambda n=position: client.router.admission.queued == n)
        await holder.close()  # the client leaves: its slot goes to the queue's head
        await asyncio.gather(*tasks)
        for api in apis.values():
            await api.close()
    assert done == ["high", "header", "low", "ignored"]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_the_priority_class_reaches_microserve_engines_only() -> None:
    """A microserve engine is sent the key's class as `priority` (its scheduler's order); an
    OpenAI-compatible server is sent the client's body untouched (vLLM refuses a priority it does not use)."""
    from microserve.router.config import RouterConfig
    from microserve.router.router import Router
    from microserve.router.workers import WorkerKind, WorkerSpec
    from tests.router_fakes import fakes, serving

    async with fakes(2) as (engine, other):
        workers = [WorkerSpec(engine.url, kind=WorkerKind.MICROSERVE, models=("fake",)),
                   WorkerSpec(other.url, kind=WorkerKind.OPENAI, models=("fake",))]  # fmt: skip
        router = Router(RouterConfig(workers=workers, admin_token="admin-secret", api_keys="memory"))
        async with serving(router) as client:
            for priority in ("high", "low"):
                key = await new_key(client, priority=priority)
                async with sdk(client, key) as api:
                    for _ in range(2):  # round robin: once on each worker
                        await api.chat.completions.create(
                            model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                        )
    assert [body.get("priority") for body in engine.generate_calls] == [-1, 1]
    assert all("priority" not in body for body in other.generate_calls)
