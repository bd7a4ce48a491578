"""The order the admission queue serves waiters in: priority classes first (strictly), then, within a
class, start-time fair queuing on tokens, so a tenant sending ten times its share cannot make another wait
behind its backlog.

Each request gets a start tag when it arrives: S = max(V, F[tenant]) and F[tenant] = S + cost / weight,
where V is the start tag of the request admitted last and cost its tokens (prompt + max_tokens). Admitting
by (class, S) serves every backlogged tenant's tokens at the same pace; a tenant that was idle starts at V
(it banks no credit). With one tenant (or keys off) the tags grow with arrival: plain FIFO.

Ordering alone cannot keep a quiet tenant's TTFT near what it is alone: its request would still wait for
one of the slots the noisy tenant holds to free up. So a request is admitted at once, over the limit if
need be (`AdmissionQueue.admit_now`, up to twice it), when its tenant holds fewer than its share of the
slots (the limit over the tenants with requests running or waiting), or when it is owed service: none of
its tenant's requests wait and its start tag is behind every competing tenant's latest finish tag (it has
been served fewer tokens than each). The second covers a quiet tenant's bursts: a tenant sending half its
share of tokens still has, now and then, more requests in flight than its share of slots, since each
lasts longer beside a busy batch. The queue refills only below the limit, so the other tenants' slots
shrink to make room.

Pure logic, no clock: the router and the simulator drive the same object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from microserve.api.errors import APIError

if TYPE_CHECKING:
    from microserve.router.admission import AdmissionQueue

# A tenant refused a slot within this many seconds is backlogged (it asks for more than it gets), so it is
# not owed service. A tenant over its share is refused many times a second; a quiet one refused once in a
# rare burst is owed again soon after.
REFUSED_MEMORY_S = 1.0

# Admission order of one request: (priority rank, start tag); compared as a tuple, lower first.
Order = tuple[int, float]


@dataclass(slots=True)
class FairShare:
    # False: every request counts as one tenant's, FIFO within a class (the queue breaks ties by arrival),
    # and nothing is kept: with no tenant counted, nobody is below its share or owed service.
    enabled: bool = True
    virtual: float = 0.0  # V: the start tag of the request admitted last
    half_life_s: float = 10.0  # how fast a tenant's recent service (for `owed`) is forgotten
    _finish: dict[str, float] = field(default_factory=dict)  # F per tenant
    _running: Counter[str] = field(default_factory=Counter)
    _waiting: Counter[str] = field(default_factory=Counter)
    _served: dict[str, tuple[float, float]] = field(default_factory=dict)  # (decayed tokens, as of when)
    _refused: dict[str, float] = field(default_factory=dict)  # when each tenant was last refused a slot

    def arrive(self, tenant: str, rank: int, cost: int, weight: float = 1.0) -> Order:
        """The order of a request arriving now from `tenant` that may use `cost` tokens."""
        if not self.enabled:
            return rank, 0.0
        start = max(self.virtual, self._finish.get(tenant, 0.0))
        self._finish[tenant] = start + max(1, cost) / weight
        if len(self._finish) > 10_000:  # tenants far behind V start at V anyway: forget them
            self._finish = {t: f for t, f in self._finish.items() if f > self.virtual}
        return rank, start

    def withdraw(self, tenant: str, order: Order, cost: int, weight: float = 1.0) -> None:
        """A request refused before it ran: it was no service, so its tenant's tag goes back (when it
        was the tenant's latest)."""
        if self._finish.get(tenant) == order[1] + max(1, cost) / weight:
            self._finish[tenant] = order[1]

    def admitted(self, order: Order) -> None:
        """A request with this order got its slot: virtual time moves to its start tag."""
        self.virtual = max(self.virtual, order[1])

    def below_share(self, tenant: str, slots: int) -> bool:
        """Whether `tenant` (about to wait) holds fewer than its share of `slots`: the slots over the
        tenants with requests running or waiting, itself included."""
        others = sum(1 for t in {*self._running, *self._waiting} if t != tenant)
        return others > 0 and self._running[tenant] < slots // (others + 1)

    def owed(self, tenant: str, slots: int, now: float) -> bool:
        """Whether `tenant` is owed service: another tenant is backlogged (requests waiting, or refused
        a slot within `REFUSED_MEMORY_S`) and `tenant` is not; `slots` give each tenant with requests
        running or waiting at least one; and `tenant` has been served less than an equal share of the
        tokens admitted lately (an average over about `half_life_s`) among them. Its request need not
        queue behind the backlogged tenants' requests."""
        active = {*self._running, *self._waiting, tenant}
        if len(active) < 2 or slots < len(active) or self._backlogged(tenant, now, own=1):
            return False
        if not any(self._backlogged(t, now) for t in active if t != tenant):
            return False
        served = {t: self._decayed(t, now) for t in active}
        return served[tenant] < sum(served.values()) / len(active)

    def _backlogged(self, tenant: str, now: float, own: int = 0) -> bool:
        """Requests of `tenant` wait (besides `own` of them), or one was refused a slot lately."""
        refused = self._refused.get(tenant)
        return self._waiting[tenant] > own or (refused is not None and now - refused < REFUSED_MEMORY_S)

    def refused(self, tenant: str, now: float) -> None:
        """A request of `tenant` was refused for want of a slot: it asks for more than it gets."""
        if not self.enabled:
            return
        self._refused[tenant] = now
        if len(self._refused) > 10_000:
            self._refused = {t: at for t, at in self._refused.items() if now - at < REFUSED_MEMORY_S}

    def served(self, tenant: str, cost: int, now: float) -> None:
        """A request of `tenant` got a slot: its tokens join the tenant's recent service."""
        if not self.enabled:
            return
        self._served[tenant] = (self._decayed(tenant, now) + max(1, cost), now)
        if len(self._served) > 10_000:  # forget tenants whose service has decayed away
            horizon = 20 * self.half_life_s
            self._served = {t: v for t, v in self._served.items() if now - v[1] < horizon}

    def _decayed(self, tenant: str, now: float) -> float:
        value, at = self._served.get(tenant, (0.0, now))
        return float(value * 0.5 ** (max(0.0, now - at) / self.half_life_s))

    def waiting(self, tenant: str, delta: int) -> None:
        if self.enabled:
            _count(self._waiting, tenant, delta)

    def running(self, tenant: str, delta: int) -> None:
        if self.enabled:
            _count(self._running, tenant, delta)


def _count(counter: Counter[str], tenant: str, delta: int) -> None:
    counter[tenant] += delta
    if counter[tenant] <= 0:
        del counter[tenant]


def admit_now(fair: FairShare, admission: AdmissionQueue, tenant: str, rank: int, cost: int) -> int | None:
    """A slot at once, while one is free and nobody waits (its ticket, for `AdmissionQueue.release`), else
    None: then `admit_waiting` waits for one. No await, so the common case costs no coroutine."""
    granted = admission.take_free()
    if granted is not None and fair.enabled:
        fair.admitted(fair.arrive(tenant, rank, cost))
        fair.running(tenant, 1)
        fair.served(tenant, cost, admission.now())
    return granted


async def admit(
    fair: FairShare, admission: AdmissionQueue, tenant: str, rank: int, cost: int, timeout_s: float
) -> int:
    """A slot for a request (its ticket, for `AdmissionQueue.release`): at once while a slot is free and
    nobody waits, or for a tenant below its share of the slots, else in its fair-share order; the
    admission queue's 429 or 503 otherwise: `admit_now`, then `admit_waiting` (the simulator calls this,
    the router the two halves)."""
    granted = admit_now(fair, admission, tenant, rank, cost)
    if granted is not None:
        return granted
    return await admit_waiting(fair, admission, tenant, rank, cost, timeout_s)


async def admit_waiting(
    fair: FairShare, admission: AdmissionQueue, tenant: str, rank: int, cost: int, timeout_s: float
) -> int:
    """`admit` once `admit_now` found no slot free: the wait (or the refusal) alone, without asking for a
    free slot a second time (the router calls the two halves, so the common case awaits nothing)."""
    if not fair.enabled:  # one tenant: its class, then arrival order; nothing to keep
        return await admission.acquire((rank, 0.0), timeout_s)
    order = fair.arrive(tenant, rank, cost)
    granted = await _queue(fair, admission, tenant, rank, cost, order, timeout_s)
    fair.running(tenant, 1)
    fair.served(tenant, cost, admission.now())
    return granted


async def _queue(
    fair: FairShare,
    admission: AdmissionQueue,
    tenant: str,
    rank: int,
    cost: int,
    order: Order,
    timeout_s: float,
) -> int:
    """Every slot taken or requests waiting: a slot at once for a tenant below its share or owed
    service, else a place in the queue in `order`."""
    fair.waiting(tenant, 1)
    try:
        now = admission.now()
        limit = admission.limit
        ahead = fair.below_share(tenant, limit) or fair.owed(tenant, limit, now)
        granted = admission.admit_now() if ahead and not admission.outranked(rank) else None
        if granted is None:
            granted = await admission.acquire(order, timeout_s=timeout_s)
            fair.admitted(order)  # (one that overtook leaves virtual time with the queue's order)
    except BaseException as exc:
        fair.withdraw(tenant, order, cost)
        if isinstance(exc, APIError):
            fair.refused(tenant, admission.now())
        raise
    finally:
        fair.waiting(tenant, -1)
    return granted
