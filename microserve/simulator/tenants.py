"""Several tenants sending at once, for `simulate --tenant`: each its own arrival stream of the workload, its
priority class and its name, which the router's fair share (`router/fair_share.py`) orders the admission
queue by. The report is per tenant, as a platform team reads it: what each was answered, refused, waited."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from microserve.bench.metrics import summarize
from microserve.bench.sender import RequestRecord
from microserve.tenants.keys import PRIORITIES


@dataclass(frozen=True, slots=True)
class TenantLoad:
    """One tenant's traffic: Poisson arrivals at `rate` requests/s (or the run's arrival kind), in
    `priority` class."""

    name: str
    rate: float
    priority: str = "normal"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tenant needs a name")
        if not self.rate > 0:
            raise ValueError(f"tenant {self.name!r}: the rate must be positive, got {self.rate:g}")
        if self.priority not in PRIORITIES:
            raise ValueError(
                f"tenant {self.name!r}: the priority must be one of {', '.join(PRIORITIES)}, "
                f"got {self.priority!r}"
            )

    @property
    def rank(self) -> int:
        return PRIORITIES[self.priority]

    @classmethod
    def parse(cls, text: str) -> TenantLoad:
        """'NAME:RATE' or 'NAME:RATE:PRIORITY', e.g. 'quiet:1.2' or 'batch:8:low'."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"--tenant takes NAME:RATE[:PRIORITY], like quiet:1.5:high, got {text!r}")
        try:
            rate = float(parts[1])
        except ValueError:
            raise ValueError(f"--tenant {text!r}: the rate must be a number of requests/s") from None
        return cls(parts[0], rate, *parts[2:])


def check_tenants(tenants: Sequence[TenantLoad]) -> None:
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError(f"--tenant names must differ, got {', '.join(names)}")


def tenant_report(
    tenants: Sequence[TenantLoad],
    records: dict[str, list[RequestRecord]],
    duration_s: float,
    percentiles: Sequence[float],
) -> list[dict[str, Any]]:
    """Per tenant: sent, answered, refused by admission (429/503), failed otherwise, and TTFT."""
    rows = []
    for tenant in tenants:
        mine = records.get(tenant.name, [])
        summary = summarize(mine, duration_s, percentiles)
        refused = sum(1 for r in mine if r.error is not None and r.error.startswith(("429", "503")))
        ttft = summary.ttft
        rows.append(
            {
                "tenant": tenant.name,
                "priority": tenant.priority,
                "rate": tenant.rate,
                "sent": len(mine),
                "completed": summary.completed,
                "refused": refused,
                "failed": summary.failed - refused,
                "ttft_ms": None
                if ttft is None
                else {"median": ttft.median, **{f"p{p:g}": v for p, v in ttft.percentiles.items()}},
            }
        )
    return rows
