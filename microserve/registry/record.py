"""What an engine publishes about itself in a registry, and how a router turns it into a worker: the
advertised URL, kind, role, labels, served models and capacity, as one JSON object under one key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from microserve.http.urls import base_url


@dataclass(slots=True, frozen=True)
class Registration:
    url: str
    models: tuple[str, ...]
    kind: str = "microserve"
    role: str = "both"
    labels: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    capacity: Mapping[str, int] = field(default_factory=dict)  # max_num_seqs, kv_blocks_total, block_size…

    def key(self, workers_prefix: str) -> str:
        return workers_prefix + quote(base_url(self.url), safe="")

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "url": self.url,
                "kind": self.kind,
                "role": self.role,
                "labels": dict(self.labels),
                "weight": self.weight,
                "models": list(self.models),
                "capacity": dict(self.capacity),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Registration:
        """Parse and check a record (ValueError if it is not one); fields it does not know are ignored,
        so a newer engine can publish more than this router reads."""
        try:
            d: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(d, dict) or not isinstance(d.get("url"), str):
            raise ValueError("a registration is a JSON object with a url")
        models = d.get("models") or []
        labels = d.get("labels") or {}
        capacity = d.get("capacity") or {}
        if not isinstance(models, list) or not isinstance(labels, dict) or not isinstance(capacity, dict):
            raise ValueError("models must be a list, labels and capacity objects")
        record = cls(
            url=d["url"],
            models=tuple(str(m) for m in models),
            kind=str(d.get("kind", "microserve")),
            role=str(d.get("role", "both")),
            labels={str(k): str(v) for k, v in labels.items()},
            weight=d.get("weight", 1),
            capacity={str(k): v for k, v in capacity.items()},
        )
        base_url(record.url)  # a bad URL is refused here; a bad kind, role or weight by the router
        return record
