"""Discovery in the router: membership applied to the pool (exact joins, drains and removals), the watched
file followed by a real router in front of fake OpenAI servers, and the URLs and records it reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from microserve.registry.etcd import EtcdTarget, prefix_end
from microserve.registry.record import Registration
from microserve.router.config import RouterConfig
from microserve.router.discovery import make_discovery
from microserve.router.discovery.etcd import worker_spec
from microserve.router.discovery.file import FileDiscovery, parse_workers
from microserve.router.discovery.membership import Membership
from microserve.router.health import HealthConfig
from microserve.router.router import Router
from microserve.router.workers import Role, WorkerPool, WorkerSpec
from tests.router_fakes import fakes, serving

A, B, C = "http://10.0.0.1:8100", "http://10.0.0.2:8100", "http://10.0.0.3:8100"


def specs(*urls: str, role: str = "both") -> list[WorkerSpec]:
    return [WorkerSpec(u, role=role, models=("m",)) for u in urls]  # type: ignore[arg-type]


def test_joiners_are_added_unhealthy_until_checked() -> None:
    pool = WorkerPool()
    members = Membership(pool, "etcd://x", drain_timeout_s=30)
    changes = members.apply(specs(A, B), now=0)
    assert [w.url for w in changes.joined] == [A, B]
    assert [w.url for w in pool] == [A, B]
    assert [w.healthy for w in pool] == [False, False]  # traffic only once a health check passes
    assert members.apply(specs(A, B), now=1).joined == []  # the same set again changes nothing
    assert not members.apply(specs(A, B), now=1)


def test_a_leaver_drains_and_leaves_once_idle() -> None:
    pool = WorkerPool()
    members = Membership(pool, "etcd://x", drain_timeout_s=30)
    members.apply(specs(A, B), now=0)
    busy = pool.get(B)
    busy.in_flight = 2
    changes = members.apply(specs(A), now=1)
    assert [w.url for w in changes.leaving] == [B]
    assert busy.draining and not busy.available
    assert members.sweep(now=2) == []  # still busy: it stays (no new requests) while those finish
    assert B in pool
    busy.in_flight = 0
    assert [w.url for w in members.sweep(now=3)] == [B]
    assert [w.url for w in pool] == [A]
    assert (members.joins, members.leaves) == (2, 1)


def test_a_busy_leaver_goes_at_the_drain_timeout() -> None:
    pool = WorkerPool()
    members = Membership(pool, "etcd://x", drain_timeout_s=5)
    members.apply(specs(A), now=0)
    pool.get(A).in_flight = 1
    members.apply([], now=10)
    assert members.sweep(now=14.9) == []
    assert [w.url for w in members.sweep(now=15)] == [A]
    assert len(pool) == 0


def test_a_leaver_that_returns_before_it_is_idle_serves_again() -> None:
    pool = WorkerPool()
    members = Membership(pool, "etcd://x", drain_timeout_s=30)
    members.apply(specs(A), now=0)
    pool.get(A).in_flight = 1
    members.apply([], now=1)
    changes = members.apply(specs(A), now=2)
    assert [w.url for w in changes.returned] == [A]
    assert not pool.get(A).draining
    assert members.sweep(now=100) == []


def test_a_changed_record_updates_the_worker_in_place() -> None:
    pool = WorkerPool()
    members = Membership(pool, "etcd://x", drain_timeout_s=30)
    members.apply(specs(A), now=0)
    worker = pool.get(A)
    changes = members.apply(specs(A, role="decode"), now=1)
    assert changes.updated == [worker] and pool.get(A) is worker
    assert worker.role is Role.DECODE


def test_a_source_leaves_other_workers_alone() -> None:
    pool = WorkerPool()
    pool.add(WorkerSpec(A))  # from flags or the admin API
    members = Membership(pool, "file://x", drain_timeout_s=30)
    changes = members.apply(specs(A, B), now=0)
    assert changes.foreign == [A] and [w.url for w in changes.joined] == [B]
    members.apply([], now=1)
    assert [w.url for w in pool if w.draining] == [B]  # A is not this source's to drain
    pool.get(B).in_flight = 0
    members.sweep(now=2)
    assert [w.url for w in pool] == [A]


def test_parse_workers_reads_lists_mappings_and_worker_flags() -> None:
    assert parse_workers(f"workers:\n  - url: {A}\n    role: prefill\n") == [WorkerSpec(A, role=Role.PREFILL)]
    assert parse_workers(f'["{A},role=decode,model=m"]') == [WorkerSpec(A, role=Role.DECODE, models=("m",))]
    assert parse_workers("") == []
    with pytest.raises(ValueError, match="list of workers"):
        parse_workers("42")
    with pytest.raises(ValueError, match="worker URL"):
        parse_workers("- url: ftp://x")


def test_discovery_urls_are_checked_when_the_config_is_made() -> None:
    assert RouterConfig(discovery="etcd://127.0.0.1:2379").discovery == ["etcd://127.0.0.1:2379"]
    with pytest.raises(ValueError, match="--discovery takes etcd://"):
        RouterConfig(discovery=["consul://x:1"])
    with pytest.raises(ValueError, match="HOST:PORT"):
        make_discovery("etcd://nohostport/x")
    assert isinstance(make_discovery("file:///tmp/w.yaml"), FileDiscovery)


def test_etcd_targets_and_prefix_ranges() -> None:
    target = EtcdTarget.parse("etcd://10.0.0.1:2379,10.0.0.2:2379/fleet/a/")
    assert target.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert target.workers_prefix == "/fleet/a/workers/"
    assert str(target) == "etcd://10.0.0.1:2379,10.0.0.2:2379/fleet/a"
    assert EtcdTarget.parse("etcd://h:1").prefix == "/microserve"
    assert prefix_end("/a/") == b"/a0"
    assert prefix_end("a\xff") == b"a\xc3\xc0"  # U+00FF is c3 bf in UTF-8: the last byte goes up
    with pytest.raises(ValueError):
        EtcdTarget.parse("http://h:1")


def test_registration_records_round_trip_and_are_checked() -> None:
    record = Registration(A, ("m",), role="prefill", labels={"zone": "a"}, capacity={"max_num_seqs": 64})
    again = Registration.from_json(record.to_json())
    assert again == record
    assert worker_spec(again) == WorkerSpec(A, role=Role.PREFILL, labels={"zone": "a"}, models=("m",))
    assert record.key("/microserve/workers/") == "/microserve/workers/http%3A%2F%2F10.0.0.1%3A8100"
    newer = b'{"url": "http://h:1", "models": ["m"], "gpu": "h200"}'  # fields it does not know: ignored
    assert Registration.from_json(newer).models == ("m",)
    for bad in (b"[]", b"{", b'{"url": "h:1"}'):
        with pytest.raises(ValueError):
            Registration.from_json(bad)
    with pytest.raises(ValueError, match="role"):  # the router's check: the registry keeps what engines wrote
        worker_spec(Registration.from_json(b'{"url": "http://h:1", "role": "chef"}'))


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_watched_file_drives_the_pool(tmp_path: Path) -> None:
    path = tmp_path / "workers.yaml"
    async with fakes(3) as servers:
        a, b, c = (s.url for s in servers)
        path.write_text(f"workers:\n  - url: {a}\n  - url: {b}\n")
        config = RouterConfig(
            discovery=[f"file://{path}"], health=HealthConfig(interval_s=0.2), admin_token="t"
        )
        router = Router(config)
        sync = router.discovery.syncs[0]
        sync.discovery.interval_s = 0.05  # type: ignore[attr-defined]
        async with serving(router) as client:
            assert [w.url for w in router.pool] == [a, b]  # read before the router serves
            assert all(w.healthy for w in router.pool)
            for _ in range(4):
                r = await client.post(
                    "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2}
                )
                assert r.status == 200
            assert [len(s.generate_calls) for s in servers] == [2, 2, 0]

            path.write_text(f"- {b}\n- {c}\n")  # a leaves, c joins
            await wait_for(lambda: [w.url for w in router.pool] == [b, c], "a out and c in")
            r = await client.get("/ready")
            ready = await r.json()
            assert ready["discovery"][0]["connected"] and ready["discovery"][0]["workers"] == 2

            path.write_text("workers: [")  # broken: the last membership stands, and the source says so
            await wait_for(lambda: not sync.discovery.status.connected, "the broken file reported")
            r = await client.get("/ready")
            body = await r.json()
            assert r.status == 200 and body["workers_available"] == 2
            assert "not valid YAML" in body["discovery"][0]["error"]
            metrics = await (await client.get("/metrics")).text()
            assert f'microserve_router_discovery_connected{{source="file://{path}"}} 0.0' in metrics
            r = await client.get("/admin/workers", headers={"Authorization": "Bearer t"})
            listed = (await r.json())["workers"]
            assert [(w["url"], w["source"]) for w in listed] == [(b, f"file://{path}"), (c, f"file://{path}")]

            path.unlink()
            await asyncio.sleep(0.2)
            assert [w.url for w in router.pool] == [b, c]


def test_engine_registration_flags() -> None:
    from microserve.cli import build_parser
    from microserve.registry.args import registration_from_args

    def options(*flags: str):  # type: ignore[no-untyped-def]
        return registration_from_args(build_parser().parse_args(["engine", "--port", "8123", *flags]))

    assert options() is None
    opts = options("--register", "etcd://127.0.0.1:2379/p", "--label", "zone=a", "--role", "decode")
    assert (opts.url, opts.ttl_s, opts.role, opts.labels) == (
        "http://127.0.0.1:8123",
        10,
        "decode",
        {"zone": "a"},
    )
    assert opts.target.workers_prefix == "/p/workers/"
    assert options("--register", "etcd://h:1", "--advertise-url", "http://gpu-7:9/").url == "http://gpu-7:9"
    with pytest.raises(ValueError, match="--advertise-url"):
        options("--register", "etcd://h:1", "--advertise-url", "gpu-7:9")
    with pytest.raises(ValueError, match="at least 2"):
        options("--register", "etcd://h:1", "--register-ttl", "1")


async def test_the_admin_listing_names_each_workers_source(tmp_path: Path) -> None:
    async with fakes(3) as (static, added, listed):
        path = tmp_path / "workers.yaml"
        path.write_text(f"- {listed.url}\n")
        config = RouterConfig(workers=[WorkerSpec(static.url)], discovery=[f"file://{path}"], admin_token="t")
        async with serving(Router(config)) as client:
            auth = {"Authorization": "Bearer t"}
            r = await client.post("/admin/workers", json={"url": added.url}, headers=auth)
            assert r.status == 201
            workers = (await (await client.get("/admin/workers", headers=auth)).json())["workers"]
            assert {w["url"]: w["source"] for w in workers} == {
                static.url: "static",
                listed.url: f"file://{path}",
                added.url: "admin",
            }
