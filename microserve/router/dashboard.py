"""The router's live /dashboard: a static page (HTML, JS, CSS shipped in the package, no build step, no CDN)
that polls /dashboard/state, the fleet and the recent requests as JSON; admin actions use /admin/*."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from microserve.api.errors import APIError
from microserve.http.server import Request, Response, Routes
from microserve.router.policies import POLICIES
from microserve.router.recent import Finished
from microserve.router.router import Router
from microserve.router.strategies import STRATEGIES
from microserve.tokens import bearer_matches

WINDOW_S = 300.0  # "the last minutes" the page summarizes
BIN_S = 10.0
RECENT_SHOWN = 50
LOAD_MAX_AGE_S = 1.0  # the page polls every second; older load reports are refreshed first

_FILES = {
    "/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


def add_dashboard_routes(routes: Routes, router: Router, started: float) -> None:
    static = resources.files("microserve.router") / "static"
    for path, (name, content_type) in _FILES.items():
        body = (static / name).read_bytes()
        routes.add("GET", path, functools.partial(_static, body, content_type))
    routes.add("GET", "/dashboard/state", functools.partial(_state, router, started))


async def _static(body: bytes, content_type: str, request: Request) -> Response:
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-cache"})


async def _state(router: Router, started: float, request: Request) -> Response:
    _check_viewer(router, request)
    try:
        window_s = float(request.query.get("window", WINDOW_S))
    except ValueError:
        raise APIError(400, "window must be a number of seconds.", param="window") from None
    if not 0 < window_s <= 24 * 3600:
        raise APIError(400, "window must be between 0 and 86400 seconds.", param="window")
    await router.refresh_loads(LOAD_MAX_AGE_S)
    return Response.json(fleet_state(router, started, window_s), headers={"Cache-Control": "no-store"})


def _check_viewer(router: Router, request: Request) -> None:
    """The state names the workers' addresses, as /metrics does: behind the metrics token when one is set,
    which the admin token (what the page's operator types) also opens."""
    token = router.config.metrics_token
    if not token:
        return
    given = request.headers.get("authorization")
    admin = router.config.admin_token
    if not (bearer_matches(given, token) or (admin and bearer_matches(given, admin))):
        raise APIError(
            401,
            "The fleet's state needs the metrics or the admin token: 'Authorization: Bearer <token>'.",
            code="unauthorized",
        )


def fleet_state(
    router: Router, started: float, window_s: float = WINDOW_S, now: float | None = None
) -> dict[str, Any]:
    """Everything the page shows, as one JSON object."""
    now = time.time() if now is None else now
    admission = router.admission
    return {
        "now": now,
        "uptime_s": now - started,
        "strategy": router.strategy.describe(),
        "policy": router.policy.describe(),
        "strategies": list(STRATEGIES),
        "policies": list(POLICIES),
        "admin": bool(router.config.admin_token),
        "admission": {
            "running": admission.running,
            "waiting": admission.queued,
            "max_concurrent": admission.limit,
            "max_queued": admission.config.max_queued,
        },
        "workers": [_worker(w) for w in router.pool],
        "traffic": summarize(
            router.recent.window(window_s, now), now, window_s, max(started, router.recent.complete_since())
        ),
        "recent": [f.to_dict() for f in router.recent.latest(RECENT_SHOWN)],
    }


def _worker(w: Any) -> dict[str, Any]:
    load = w.load
    return {
        "url": w.url,
        "kind": str(w.kind),
        "role": str(w.role),
        "models": sorted(w.models),
        "healthy": w.healthy,
        "draining": w.draining,
        "circuit": w.breaker.state.name.lower(),
        "in_flight": w.in_flight,
        "requests": w.requests,
        "errors": sum(w.errors.values()),
        "load": None
        if load is None
        else {
            "waiting": load.waiting,
            "running": load.running,
            "kv_usage": load.kv_usage,
            "prefix_hit_rate": load.prefix_hit_rate,
            "age_s": max(0.0, time.monotonic() - load.at),
        },
    }


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list; None for an empty one."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats going astray
    return sorted_values[int(rank) - 1]


def _latency(records: Sequence[Finished]) -> dict[str, float | None]:
    ttft = sorted(f.ttft_s for f in records if f.ttft_s is not None)
    tpot = sorted(t for f in records if (t := f.tpot_s) is not None)
    return {
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
    }


def summarize(
    records: Sequence[Finished], now: float, window_s: float, since: float = float("-inf")
) -> dict[str, Any]:
    """Rate, errors and latency percentiles of `records` (oldest first) over the window, overall and per
    `BIN_S` bin. The figures reach back no further than `since` (the router's start, or the oldest request
    the ring still holds once it dropped older ones): `span_s` says how far they really reach."""
    span = max(now - max(now - window_s, since), 1e-9)
    n_bins = max(1, math.ceil(span / BIN_S - 1e-9))
    first = now - n_bins * BIN_S
    grouped: list[list[Finished]] = [[] for _ in range(n_bins)]
    for f in records:
        if f.at >= now - span:
            grouped[min(n_bins - 1, max(0, int((f.at - first) // BIN_S)))].append(f)
    kept = [f for group in grouped for f in group]
    errors = sum(1 for f in kept if f.status >= 500)
    return {
        "window_s": window_s,
        "span_s": span,
        "requests": len(kept),
        "rate_per_s": len(kept) / span,
        "errors": errors,
        "rejected": sum(1 for f in kept if f.status == 429),
        "error_ratio": errors / len(kept) if kept else 0.0,
        **_latency(kept),
        "bin_s": BIN_S,
        "bins": [
            {
                "end": first + (i + 1) * BIN_S,
                "requests": len(group),
                "errors": sum(1 for f in group if f.status >= 500),
                **_latency(group),
            }
            for i, group in enumerate(grouped)
        ],
    }
