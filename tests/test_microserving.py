"""Microserving verbs over real engine processes: disaggregated, cache-aware and balanced prefill,
context migration, and faults that must leave no block behind on either side."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import pytest

from microserve.engine.kv_storage import KVLayout, KVStorage
from microserve.engine_client import EngineClient, EngineError
from microserve.processes import engine_process, free_port, start_engine

pytestmark = pytest.mark.slow

COMMON = (
    "--dtype",
    "float32",
    "--max-model-len",
    "4096",
    "--kv-cache-memory",
    "256MiB",
    "--reservation-ttl",
    "10",  # long enough for a 3000-token prefill's first piece on a loaded machine, short for the expiry test
)
# KV moves only between engines that share the internal token (remote_send authenticates its receiver).
TOKEN = "test-internal-token"
ENV = {"MICROSERVE_INTERNAL_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def urls():
    with engine_process(*COMMON, env=ENV) as a, engine_process(*COMMON, env=ENV) as b:
        yield a, b


def greedy(n: int = 16) -> dict:
    return {"max_tokens": n, "temperature": 0, "ignore_eos": True}


def prompt_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


async def idle(*clients: EngineClient, timeout: float = 10.0) -> None:
    """Wait until every engine holds no block for a live request or reservation."""
    deadline = time.monotonic() + timeout
    while True:
        loads = [await c.load() for c in clients]
        if all(ld["kv_blocks_free"] == ld["kv_blocks_total"] and ld["kv_reservations"] == 0 for ld in loads):
            return
        assert time.monotonic() < deadline, f"blocks still held: {loads}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def clients(*urls: str):
    cs = [EngineClient(u, internal_token=TOKEN) for u in urls]
    try:
        yield cs
    finally:
        for c in cs:
            await c.close()


async def pd(
    p: EngineClient, d: EngineClient, rid: str, ids: list[int], split: int, **sampling
) -> tuple[str, dict]:
    """The balanced-disaggregation recipe: the decode engine receives KV up to `split`, computes the rest."""
    addr = await d.prep_recv(rid, ids, end=split)
    sent = {"sent_tokens": 0, "bytes": 0}
    if addr.matched < split:
        sent = await p.remote_send(rid, ids, addr, d, begin=addr.matched, end=split)
    out = await d.start_generate(rid, ids, begin=split, **sampling)
    return out["choices"][0]["text"], sent


async def test_disaggregated_prefill_decode_matches_one_engine(urls):
    async with clients(*urls) as (a, b):
        ids = prompt_ids(1, 300)
        want = (await a.completions(prompt=ids, **greedy()))["choices"][0]["text"]
        text, sent = await pd(a, b, "pd-1", ids, split=len(ids) - 1, **greedy())
        assert text == want
        assert sent["sent_tokens"] == len(ids) - 1
        await idle(a, b)


async def test_cache_aware_transfer_sends_only_missing_tokens(urls):
    async with clients(*urls) as (a, b):
        shared = prompt_ids(2, 200)
        await b.completions(prompt=[*shared, 5000], max_tokens=1)  # b now caches shared's full blocks
        ids = shared + prompt_ids(3, 90)
        split = len(ids) - 1
        addr = await b.prep_recv("ca-1", ids, end=split)
        assert addr.matched == 192  # 12 full blocks of 16 of the 200 shared tokens
        sent = await a.remote_send("ca-1", ids, addr, b, begin=addr.matched, end=split)
        layout = KVLayout(**addr.info["layout"])
        assert sent["sent_tokens"] == split - 192
        payload_bytes = sent["sent_tokens"] * layout.bytes_per_token
        assert payload_bytes < sent["bytes"] < payload_bytes + 1024  # + one small header per piece
        out = await b.start_generate("ca-1", ids, begin=split, **greedy())
        want = (await a.completions(prompt=ids, **greedy()))["choices"][0]["text"]
        assert out["choices"][0]["text"] == want
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == split
        await idle(a, b)


async def test_balanced_ratio_decode_engine_prefills_the_tail(urls):
    async with clients(*urls) as (a, b):
        ids = prompt_ids(4, 250)
        split = int(len(ids) * (1 - 0.2))
        want = (await a.completions(prompt=ids, **greedy()))["choices"][0]["text"]
        text, sent = await pd(a, b, "bal-1", ids, split=split, **greedy())
        assert text == want and sent["sent_tokens"] == split
        await idle(a, b)


async def test_context_migration_next_turn_hits_prefix_cache(urls):
    async with clients(*urls) as (a, b):
        turn1 = [{"role": "user", "content": "Name three colours of the rainbow."}]
        r1 = await a.chat(messages=turn1, max_tokens=24, temperature=0)
        history = [*turn1, {"role": "assistant", "content": r1["choices"][0]["message"]["content"]}]
        turn2 = [*history, {"role": "user", "content": "And two more?"}]
        # The conversation so far migrates from a to b: reserve on b, push from a, release on b.
        context = await asyncio.to_thread(_tokens, history)
        addr = await b.prep_recv("mig-1", context)
        assert addr.info["end"] == len(context) and addr.matched == 0
        sent = await a.remote_send("mig-1", context, addr, b)
        assert sent["sent_tokens"] == len(context)
        assert await b.release("mig-1")  # the received KV stays in b's prefix cache
        on_b = await b.chat(messages=turn2, max_tokens=24, temperature=0)
        on_a = await a.chat(messages=turn2, max_tokens=24, temperature=0)
        assert on_b["usage"]["prompt_tokens_details"]["cached_tokens"] == len(context) // 16 * 16
        assert on_b["choices"][0]["message"]["content"] == on_a["choices"][0]["message"]["content"]
        await idle(a, b)


def _tokens(messages: list[dict]) -> list[int]:
    from microserve.model.loader import resolve_model
    from microserve.model.tokenizer import Tokenizer

    tok = Tokenizer.load(resolve_model("smollm2-135m"))
    return tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=False), add_special_tokens=False
    )


async def test_fault_receiver_unreachable(urls):
    async with clients(*urls) as (a, b):
        ids = prompt_ids(5, 120)
        addr = await b.prep_recv("f-unreach", ids, end=100)
        with pytest.raises(EngineError) as err:
            await a.remote_send("f-unreach", ids, addr, f"http://127.0.0.1:{free_port()}", end=100)
        # Nobody there to prove it is a peer: refused before any prefill or KV is sent.
        assert err.value.status == 403 and err.value.code == "peer_not_authenticated"
        assert await b.release("f-unreach")
        await idle(a, b)


async def test_fault_unknown_and_expired_reservations(urls):
    async with clients(*urls) as (a, b):
        ids = prompt_ids(6, 80)
        with pytest.raises(EngineError) as err:
            await b.start_generate("f-unknown", ids, begin=79, max_tokens=4)
        assert err.value.status == 404 and "no KV reservation" in err.value.message
        # remote_send towards a reservation the receiver never made: the sender reports the receiver's word.
        fake = {
            "request_id": "f-nothing",
            "begin": 0,
            "end": 79,
            "layout": (await b.prep_recv("tmp", ids)).info["layout"],
        }
        await b.release("tmp")
        with pytest.raises(EngineError) as err:
            await a.remote_send("f-nothing", ids, _Addr(fake), b, end=79)
        assert err.value.status == 502 and "no KV reservation" in err.value.message
        # expiry: the engines run with --reservation-ttl 10
        addr = await b.prep_recv("f-expire", ids, end=79)
        assert (await b.load())["kv_reservations"] == 1
        await idle(b, timeout=30)
        with pytest.raises(EngineError) as err:
            await a.remote_send("f-expire", ids, addr, b, end=79)
        assert err.value.status == 502
        with pytest.raises(EngineError) as err:
            await b.start_generate("f-expire", ids, begin=79, max_tokens=4)
        assert err.value.status == 404
        await idle(a, b)


class _Addr:
    def __init__(self, info: dict) -> None:
        self.info, self.matched = info, 0


async def test_fault_corrupt_payload_rejected_by_receiver(urls):
    async with clients(*urls) as (_, b):
        ids = prompt_ids(7, 40)
        addr = await b.prep_recv("f-corrupt", ids, end=32)
        layout = KVLayout(**addr.info["layout"])
        storage = KVStorage(layout, num_blocks=2)
        import torch

        payload = bytearray(storage.export(torch.arange(32), 0, 32, ids[:32]))
        payload[-3] ^= 0x55
        auth = {"Authorization": f"Bearer {TOKEN}"}
        status, body = await b.http.fetch(
            "POST", b.url, "/microserving/kv/f-corrupt", body=bytes(payload), headers=auth
        )
        assert status == 400
        assert "checksum" in json.loads(body)["error"]["message"]
        assert await b.release("f-corrupt")
        await idle(b)


async def test_fault_incompatible_model_and_sender_killed(urls):
    _, b_url = urls
    # A bf16 engine's KV cannot be imported into an fp32 engine.
    with engine_process(
        "--dtype", "bfloat16", "--max-model-len", "4096", "--kv-cache-memory", "256MiB", env=ENV
    ) as c_url:
        async with clients(b_url, c_url) as (b, c):
            ids = prompt_ids(8, 64)
            addr = await b.prep_recv("f-incompat", ids, end=60)
            with pytest.raises(EngineError) as err:
                await c.remote_send("f-incompat", ids, addr, b, end=60)
            assert err.value.status == 400 and "incompatible KV layout" in err.value.message
            assert await b.release("f-incompat")
            await idle(b, c)
    # The sender dies in the middle of a long transfer: the receiver refuses to start and frees everything.
    sender = start_engine(*COMMON, env=ENV)
    try:
        async with clients(b_url, sender.url) as (b, c):
            ids = prompt_ids(9, 3000)
            addr = await b.prep_recv("f-killed", ids, end=2999)
            send = asyncio.create_task(c.remote_send("f-killed", ids, addr, b, end=2999))
            await _until(lambda: _some_kv_arrived(b))
            sender.kill()
            with pytest.raises(Exception):  # noqa: B017 - the connection dies, whatever the exception
                await send
            with pytest.raises(EngineError) as err:
                await b.start_generate("f-killed", ids, begin=2999, max_tokens=2)
            assert err.value.status == 404 and "never arrived" in err.value.message
            assert await b.release("f-killed")
            await idle(b)
    finally:
        sender.stop()


async def _some_kv_arrived(engine: EngineClient) -> bool:
    return (await engine.load())["kv_reservations_received_tokens"] > 0


async def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_internal_token_is_required_when_set():
    with engine_process(*COMMON, "--internal-token", "s3cret") as url:
        async with EngineClient(url) as anon, EngineClient(url, internal_token="s3cret") as ok:
            with pytest.raises(EngineError) as err:
                await anon.prep_recv("t-1", [1, 2, 3])
            assert err.value.status == 401
            addr = await ok.prep_recv("t-1", [1, 2, 3])
            assert addr.matched == 0 and await ok.release("t-1")
            assert (await anon.completions(prompt=[1, 2, 3], max_tokens=1))["usage"]["completion_tokens"] == 1


async def test_sim_backend_implements_the_verbs_with_modelled_transfer_time():
    from microserve.runner.cost_model import CostModel

    sim = ("--backend", "sim", "--max-model-len", "4096", "--kv-cache-memory", "256MiB")
    with engine_process(*sim, env=ENV) as a_url, engine_process(*sim, env=ENV) as b_url:
        async with clients(a_url, b_url) as (a, b):
            ids = prompt_ids(10, 2000)
            want = (await a.completions(prompt=ids, **greedy(8)))["choices"][0]["text"]
            started = time.monotonic()
            text, sent = await pd(a, b, "sim-pd", ids, split=len(ids) - 1, **greedy(8))
            elapsed = time.monotonic() - started
            assert text == want and sent["sent_tokens"] == len(ids) - 1
            # The sender waited (at least) for the real model's KV to cross at the modelled bandwidth.
            assert elapsed >= CostModel.default().kv_transfer_time(len(ids) - 1)
            await idle(a, b)
