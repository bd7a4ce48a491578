"""Reservations of KV blocks for a transfer that is on its way (the receiving side of microserving).

`prep_recv` creates one: blocks for prompt[matched:end] held under the request id until the KV arrives and
`start_generate` takes them, `release` drops them, or their time-to-live runs out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from microserve.engine.sequence import Sequence


class ReservationError(ValueError):
    """A microserving call names a reservation that does not exist, has expired, or is incomplete."""


@dataclass(slots=True)
class Reservation:
    seq: Sequence  # token_ids = prompt[:end]; num_computed_tokens = the locally matched prefix
    end: int
    matched: int
    deadline: float
    received_upto: int = 0  # KV for [matched, received_upto) has arrived

    def __post_init__(self) -> None:
        self.received_upto = self.matched


@dataclass(slots=True)
class ReservationTable:
    ttl_s: float = 30.0
    _by_id: dict[str, Reservation] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def add(self, seq: Sequence, end: int, matched: int, now: float | None = None) -> Reservation:
        res = Reservation(seq, end, matched, (now or time.monotonic()) + self.ttl_s)
        self._by_id[seq.request_id] = res
        return res

    def get(self, request_id: str) -> Reservation:
        res = self._by_id.get(request_id)
        if res is None:
            raise ReservationError(
                f"no KV reservation for request {request_id!r} (unknown, released or expired)"
            )
        return res

    def pop(self, request_id: str) -> Reservation | None:
        return self._by_id.pop(request_id, None)

    def expired(self, now: float | None = None) -> list[Reservation]:
        now = time.monotonic() if now is None else now
        return [r for r in self._by_id.values() if r.deadline <= now]

    def received_tokens(self) -> int:
        """Tokens of KV that arrived for reservations still open (a transfer's progress)."""
        return sum(r.received_upto - r.matched for r in self._by_id.values())

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self._by_id.values()), default=None)
