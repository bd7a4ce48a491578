"""The reservation table: blocks charged to each requester, its bound, and the charge returned when a
reservation is taken, released or expires."""

from __future__ import annotations

import pytest

from microserve.engine.reservations import ReservationQuotaExceeded, ReservationTable
from microserve.engine.sampling import SamplingParams
from microserve.engine.sequence import Sequence


def seq(request_id: str) -> Sequence:
    return Sequence(request_id, [1, 2, 3], SamplingParams(max_tokens=1))


def test_each_requester_is_charged_its_own_blocks() -> None:
    table = ReservationTable(ttl_s=30.0, max_blocks_per_requester=10)
    table.add(seq("a1"), 3, 0, now=0.0, requester="10.0.0.1", blocks=4)
    table.add(seq("a2"), 3, 0, now=0.0, requester="10.0.0.1", blocks=6)
    table.add(seq("b1"), 3, 0, now=0.0, requester="10.0.0.2", blocks=10)
    assert table.held_by("10.0.0.1") == 10 and table.held_by("10.0.0.2") == 10
    with pytest.raises(ReservationQuotaExceeded, match="limit of 10"):
        table.check_quota("10.0.0.1", 1)
    table.check_quota("10.0.0.3", 10)  # another requester is not held back by the first two


def test_the_charge_is_returned_when_a_reservation_leaves() -> None:
    table = ReservationTable(ttl_s=30.0, max_blocks_per_requester=10)
    table.add(seq("a1"), 3, 0, now=0.0, requester="r", blocks=4)
    table.add(seq("a2"), 3, 0, now=0.0, requester="r", blocks=6)
    table.pop("a1")
    assert table.held_by("r") == 6
    table.check_quota("r", 4)
    table.pop("a2")
    assert table.held_by("r") == 0 and table._held == {}  # no entry left for an idle requester
    assert table.pop("a2") is None


def test_without_a_bound_any_amount_passes() -> None:
    table = ReservationTable()
    table.check_quota("r", 10**9)


def test_expired_reservations_are_found_by_their_deadline() -> None:
    table = ReservationTable(ttl_s=5.0, max_blocks_per_requester=10)
    table.add(seq("a"), 3, 0, now=0.0, requester="r", blocks=2)
    table.add(seq("b"), 3, 0, now=3.0, requester="r", blocks=2)
    assert [r.seq.request_id for r in table.expired(now=6.0)] == ["a"]
    assert table.next_deadline() == 5.0
