"""The order the admission queue serves waiters in: priority classes first (strictly), then, within a
class, start-time fair queuing on tokens, so a tenant sending ten times its share cannot make another wait
behind its backlog.

Each request gets a start tag when it arrives: S = max(V, F[tenant]) and F[tenant] = S + cost / weight,
where V is the start tag of the request admitted last and cost its tokens (prompt + max_tokens). Admitting
by (class, S) serves every backlogged tenant's tokens at the same pace; a tenant that was idle starts at V
(it banks no credit). With one tenant (or keys off) the tags grow with arrival: plain FIFO.

Ordering alone cannot keep a quiet tenant's TTFT near what it is alone: its request would still wait for
one of the slots the noisy tenant holds to free up. So a tenant holding fewer than its share of the slots
(the limit over the tenants with requests running or waiting) is admitted at once, over the limit if need
be (`AdmissionQueue.admit_now`); the queue refills only below the limit, so the other tenants' slots
shrink until each holds its share.

Pure logic, no clock: the router and the simulator drive the same object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microserve.router.admission import AdmissionQueue

# Admission order of one request: (priority rank, start tag); compared as a tuple, lower first.
Order = tuple[int, float]


@dataclass(slots=True)
class FairShare:
    enabled: bool = True  # False: every request counts as one tenant's (FIFO within a class)
    virtual: float = 0.0  # V: the start tag of the request admitted last
    _finish: dict[str, float] = field(default_factory=dict)  # F per tenant
    _running: Counter[str] = field(default_factory=Counter)
    _waiting: Counter[str] = field(default_factory=Counter)

    def tenant(self, name: str) -> str:
        return name if self.enabled else ""

    def arrive(self, tenant: str, rank: int, cost: int, weight: float = 1.0) -> Order:
        """The order of a request arriving now from `tenant` that may use `cost` tokens."""
        tenant = self.tenant(tenant)
        start = max(self.virtual, self._finish.get(tenant, 0.0))
        self._finish[tenant] = start + max(1, cost) / weight
        if len(self._finish) > 10_000:  # tenants far behind V start at V anyway: forget them
            self._finish = {t: f for t, f in self._finish.items() if f > self.virtual}
        return rank, start

    def withdraw(self, tenant: str, order: Order, cost: int, weight: float = 1.0) -> None:
        """A request refused before it ran: it was no service, so its tenant's tag goes back (when it
        was the tenant's latest)."""
        tenant = self.tenant(tenant)
        if self._finish.get(tenant) == order[1] + max(1, cost) / weight:
            self._finish[tenant] = order[1]

    def admitted(self, order: Order) -> None:
        """A request with this order got its slot: virtual time moves to its start tag."""
        self.virtual = max(self.virtual, order[1])

    def below_share(self, tenant: str, slots: int) -> bool:
        """Whether `tenant` (about to wait) holds fewer than its share of `slots`: the slots over the
        tenants with requests running or waiting, itself included."""
        tenant = self.tenant(tenant)
        others = sum(1 for t in {*self._running, *self._waiting} if t != tenant)
        return others > 0 and self._running[tenant] < slots // (others + 1)

    def waiting(self, tenant: str, delta: int) -> None:
        _count(self._waiting, self.tenant(tenant), delta)

    def running(self, tenant: str, delta: int) -> None:
        _count(self._running, self.tenant(tenant), delta)


def _count(counter: Counter[str], tenant: str, delta: int) -> None:
    counter[tenant] += delta
    if counter[tenant] <= 0:
        del counter[tenant]


async def admit(
    fair: FairShare, admission: AdmissionQueue, tenant: str, rank: int, cost: int, timeout_s: float
) -> int:
    """A slot for a request (its ticket, for `AdmissionQueue.release`): at once for a tenant below
    its share of the slots, else in its fair-share order; the admission queue's 429 or 503 otherwise.
    The router and the simulator both admit through here."""
    order = fair.arrive(tenant, rank, cost)
    fair.waiting(tenant, 1)
    try:
        granted = admission.admit_now() if fair.below_share(tenant, admission.limit) else None
        if granted is None:
            granted = await admission.acquire(order, timeout_s=timeout_s)
            fair.admitted(order)  # (one that overtook leaves virtual time with the queue's order)
    except BaseException:
        fair.withdraw(tenant, order, cost)
        raise
    finally:
        fair.waiting(tenant, -1)
    fair.running(tenant, 1)
    return granted
