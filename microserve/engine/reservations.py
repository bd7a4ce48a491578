"""Reservations of KV blocks for a transfer that is on its way (the receiving side of microserving).

`prep_recv` creates one: blocks for prompt[matched:end] held under the request id until the KV arrives and
`start_generate` takes them, `release` drops them, or their time-to-live runs out. The blocks one requester
holds in reservations are bounded, so that no caller can reserve most of the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from microserve.engine.sequence import Sequence


class ReservationError(ValueError):
    """A microserving call names a reservation that does not exist, has expired, or is incomplete."""


class ReservationQuotaExceeded(Exception):
    """A requester asked for more reserved blocks than its share of the cache (HTTP 429)."""


@dataclass(slots=True)
class Reservation:
    seq: Sequence  # token_ids = prompt[:end]; num_computed_tokens = the locally matched prefix
    end: int
    matched: int
    deadline: float
    requester: str = ""  # who asked for it (the caller's address): its blocks count against its share
    blocks: int = 0  # blocks the reservation holds, cached prefix blocks included
    received_upto: int = 0  # KV for [matched, received_upto) has arrived

    def __post_init__(self) -> None:
        self.received_upto = self.matched


@dataclass(slots=True)
class ReservationTable:
    ttl_s: float = 30.0
    max_blocks_per_requester: int | None = None  # None: no bound (the cache itself is the limit)
    _by_id: dict[str, Reservation] = field(default_factory=dict)
    _held: dict[str, int] = field(default_factory=dict)  # requester -> blocks in its reservations

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def check_quota(self, requester: str, blocks: int) -> None:
        """Raise ReservationQuotaExceeded if `requester` may not reserve `blocks` more now."""
        limit = self.max_blocks_per_requester
        held = self._held.get(requester, 0)
        if limit is not None and held + blocks > limit:
            raise ReservationQuotaExceeded(
                f"this requester holds {held} reserved KV blocks; {blocks} more would pass its limit of "
                f"{limit}: start_generate or release some first, or retry later"
            )

    def held_by(self, requester: str) -> int:
        return self._held.get(requester, 0)

    def add(
        self,
        seq: Sequence,
        end: int,
        matched: int,
        now: float | None = None,
        requester: str = "",
        blocks: int = 0,
    ) -> Reservation:
        now = time.monotonic() if now is None else now
        res = Reservation(seq, end, matched, now + self.ttl_s, requester, blocks)
        self._by_id[seq.request_id] = res
        self._held[requester] = self._held.get(requester, 0) + blocks
        return res

    def get(self, request_id: str) -> Reservation:
        res = self._by_id.get(request_id)
        if res is None:
            raise ReservationError(
                f"no KV reservation for request {request_id!r} (unknown, released or expired)"
            )
        return res

    def pop(self, request_id: str) -> Reservation | None:
        res = self._by_id.pop(request_id, None)
        if res is not None:
            left = self._held[res.requester] - res.blocks
            if left:
                self._held[res.requester] = left
            else:
                del self._held[res.requester]  # no entry per requester that holds nothing
        return res

    def expired(self, now: float | None = None) -> list[Reservation]:
        now = time.monotonic() if now is None else now
        return [r for r in self._by_id.values() if r.deadline <= now]

    def received_tokens(self) -> int:
        """Tokens of KV that arrived for reservations still open (a transfer's progress)."""
        return sum(r.received_upto - r.matched for r in self._by_id.values())

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self._by_id.values()), default=None)
