"""Keys: made with a secret shown once and stored as a digest, validated fields, the keys file."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from microserve.tenants.keys import KeyRecord, digest
from microserve.tenants.store import MemoryStore


def test_create_stores_only_the_digest() -> None:
    record, secret = KeyRecord.create({"tenant": "acme", "rpm": 10, "models": ["m"]})
    assert secret.startswith("sk-ms-") and len(secret) > 40
    assert record.key_hash == digest(secret)
    assert secret not in orjson.dumps(record.to_dict()).decode()
    assert "key_hash" not in record.public()
    assert record.models == ("m",) and record.allows("m") and not record.allows("other")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({}, "tenant is required"),
        ({"tenant": "a", "rpm": 0}, "rpm must be a positive integer"),
        ({"tenant": "a", "tpm": True}, "tpm must be a positive integer"),
        ({"tenant": "a", "priority": "urgent"}, "priority must be one of"),
        ({"tenant": "a", "models": "m"}, "models must be a list"),
        ({"tenant": "a", "key_hash": "x"}, "read-only"),
    ],
)
def test_create_refuses_bad_fields(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyRecord.create(spec)


def test_priority_header_only_where_the_key_allows_it() -> None:
    fixed, _ = KeyRecord.create({"tenant": "a", "priority": "low"})
    free, _ = KeyRecord.create({"tenant": "a", "priority": "low", "priority_header": True})
    assert fixed.rank("high") == 2 and free.rank("high") == 0 and free.rank(None) == 2


async def test_keys_file_round_trip_and_hand_written_secrets(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"keys": [{"id": "k1", "tenant": "ops", "key": "sk-by-hand", "rpm": 5}]}')
    store = MemoryStore(path)
    assert (await store.key_by_hash(digest("sk-by-hand"))).tenant == "ops"  # type: ignore[union-attr]
    record, secret = KeyRecord.create({"tenant": "acme"})
    await store.put_key(record)
    assert "sk-by-hand" not in path.read_text() and secret not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0
    again = MemoryStore(path)
    assert {r.id for r in await again.keys()} == {"k1", record.id}
    assert await again.delete_key("k1") and not await again.delete_key("k1")
    assert {r.id for r in await MemoryStore(path).keys()} == {record.id}


def test_a_bad_keys_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"keys": [{"tenant": "x"}]}')
    with pytest.raises(ValueError, match="not a keys file"):
        MemoryStore(path)
