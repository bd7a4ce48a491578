"""Worker specs from flags and dicts, and the pool's candidates."""

from __future__ import annotations

import pytest

from microserve.router.workers import Role, WorkerKind, WorkerPool, WorkerSpec


def test_worker_spec_from_flag_and_dict() -> None:
    spec = WorkerSpec.parse("http://h:8000/,kind=openai,role=decode,weight=2,model=a,model=b,label.zone=x")
    assert spec.url == "http://h:8000" and spec.kind is WorkerKind.OPENAI and spec.role is Role.DECODE
    assert (spec.weight, spec.models, dict(spec.labels)) == (2, ("a", "b"), {"zone": "x"})
    assert WorkerSpec.from_dict(spec.to_dict()) == spec
    for bad, message in [
        ("localhost:8000", "http://host:port"),
        ("http://h:1/v1", "without a path"),
        ("http://h:1,role=boss", "role must be one of"),
        ("http://h:1,weight=0", "positive"),
        ("http://h:1,speed=9", "unknown worker option"),
    ]:
        with pytest.raises(ValueError, match=message):
            WorkerSpec.parse(bad)
    with pytest.raises(ValueError, match="unknown worker field"):
        WorkerSpec.from_dict({"url": "http://h:1", "colour": "red"})


def test_pool_candidates_filter_by_model_role_kind_and_state() -> None:
    pool = WorkerPool()
    a = pool.add(WorkerSpec("http://a:1", models=("m",)))
    b = pool.add(WorkerSpec("http://b:1", role=Role.DECODE, models=("m",)))
    c = pool.add(WorkerSpec("http://c:1", kind=WorkerKind.OPENAI, models=("m", "n")))
    assert pool.models() == ["m", "n"]
    assert pool.candidates("m") == [a, c]  # whole requests need role both
    assert pool.candidates("m", Role.DECODE) == [a, b, c]
    assert pool.candidates("m", Role.DECODE, WorkerKind.MICROSERVE) == [a, b]
    assert pool.candidates("n") == [c]
    assert pool.candidates("m", exclude={"http://a:1"}) == [c]
    assert pool.candidates("n", exclude={"http://c:1"}) == [c]  # nothing else left: a retry may go back
    b.draining = True
    a.healthy = False
    assert pool.candidates("m", Role.DECODE) == [c]
    with pytest.raises(ValueError, match="already"):
        pool.add(WorkerSpec("http://a:1"))
