"""An API key as the gateway stores it: hashed, owned by a tenant, with its models, limits and priority.

The secret itself is shown once (when made) and never stored or logged: keys are random 256-bit tokens, so
one SHA-256 is a safe digest (no dictionary to guess from) and a lookup by digest costs one hash.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

KEY_PREFIX = "sk-ms-"
# Admission order: a lower rank is admitted first.
PRIORITIES = {"high": 0, "normal": 1, "low": 2}
LIMITS = ("rpm", "tpm", "max_concurrent", "daily_tokens")


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(slots=True, frozen=True)
class KeyRecord:
    """What a key may do. A limit of None is no limit; `models` None is every model."""

    id: str
    tenant: str
    key_hash: str
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    priority: str = "normal"
    priority_header: bool = False  # the client may choose its class with `x-priority`
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.tenant:
            raise ValueError("tenant must be a non-empty string")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
        for name in LIMITS:
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer or null")

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def rank(self, requested: str | None) -> int:
        """The admission rank of a request: the key's class, or the header's where the key allows it."""
        if requested is not None and self.priority_header and requested in PRIORITIES:
            return PRIORITIES[requested]
        return PRIORITIES[self.priority]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = None if self.models is None else list(self.models)
        return d

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the digest."""
        d = self.to_dict()
        del d["key_hash"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KeyRecord:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown key field(s): {', '.join(unknown)}")
        d = dict(d)
        if d.get("models") is not None:
            d["models"] = _models(d["models"])
        return cls(**d)

    @classmethod
    def create(cls, spec: dict[str, Any]) -> tuple[KeyRecord, str]:
        """A new key from the admin API's fields: (record, the secret to show once)."""
        _check_fields(spec, creating=True)
        secret = new_secret()
        record = cls.from_dict({**spec, "id": "key_" + secrets.token_hex(8), "key_hash": digest(secret)})
        return record, secret

    def patched(self, changes: dict[str, Any]) -> KeyRecord:
        _check_fields(changes, creating=False)
        if "models" in changes and changes["models"] is not None:
            changes = {**changes, "models": _models(changes["models"])}
        return replace(self, **changes)


EDITABLE = {"tenant", "models", *LIMITS, "priority", "priority_header"}


def _check_fields(spec: dict[str, Any], *, creating: bool) -> None:
    unknown = sorted(set(spec) - EDITABLE)
    if unknown:
        raise ValueError(f"unknown or read-only field(s): {', '.join(unknown)}")
    if creating and not isinstance(spec.get("tenant"), str):
        raise ValueError("tenant is required (a string)")
    if "tenant" in spec and not isinstance(spec["tenant"], str):
        raise ValueError("tenant must be a string")
    if "priority_header" in spec and not isinstance(spec["priority_header"], bool):
        raise ValueError("priority_header must be true or false")


def _models(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise ValueError("models must be a list of model names or null")
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
