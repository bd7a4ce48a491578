"""The autoscaler: how many replicas each pool (a role) should have, from the load it sees now.

Pure decision logic on an injected time, so `serve` drives it on the wall clock and the simulator on its
virtual clock; an actuator (local processes, a desired-replicas metric) turns decisions into engines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from microserve.router.workers import Worker


@dataclass(slots=True, frozen=True)
class AutoscalerConfig:
    """Bounds, targets and timings for one pool.

    A replica is "full" at `target_load` requests (router queue + engines' waiting + running). The pool
    grows as soon as the load needs more replicas (or KV usage or TTFT say it is overloaded) and shrinks,
    to what the load needs at `down_ratio` of the target, only after the load has fit in fewer replicas at
    that ratio for `scale_down_after_s`: the gap between the two thresholds and the wait are the hysteresis.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_load: float = 8.0
    down_ratio: float = 0.5
    kv_high: float = 0.9  # KV usage at which a pool counts as overloaded whatever its request count
    ttft_slo_s: float | None = None  # a recent TTFT p99 above it counts as overloaded
    scale_up_cooldown_s: float = 5.0  # after a step up, before the next one (new replicas take time to help)
    scale_down_after_s: float = 30.0  # low load this long before each step down
    down_step: int | None = 1  # replicas one step down may remove; None: straight to what the load needs
    # Scale up for the load expected this many seconds ahead at its current growth rate (a replica's
    # start-up is the natural value: what it will face once it is up); 0 sizes on the load now.
    growth_lookahead_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min replicas <= max replicas and max replicas >= 1")
        if self.target_load <= 0 or not 0 < self.down_ratio < 1:
            raise ValueError("need target load > 0 and 0 < down ratio < 1")
        if self.down_step is not None and self.down_step < 1:
            raise ValueError("a step down removes at least one replica")
        if self.scale_up_cooldown_s < 0 or self.scale_down_after_s < 0 or self.growth_lookahead_s < 0:
            raise ValueError("cooldowns and the growth lookahead must be >= 0 seconds")


@dataclass(slots=True, frozen=True)
class PoolSignals:
    """What one pool looks like now. `replicas` counts those up and those starting."""

    replicas: int
    queued: int = 0  # requests held in the router for this pool
    waiting: int = 0  # engines' waiting requests, summed
    running: int = 0  # engines' running requests, summed
    kv_usage: float = 0.0  # the highest replica's KV usage, 0..1
    ttft_p99_s: float | None = None  # recent, None while unknown

    @property
    def load(self) -> int:
        return self.queued + self.waiting + self.running


@dataclass(slots=True)
class Autoscaler:
    """One pool's decisions. `decide` is called periodically and returns the desired replica count."""

    config: AutoscalerConfig
    desired: int | None = None
    last_up_at: float = -math.inf
    low_since: float | None = None  # when the load last became low enough to lose a replica
    reason: str = "start"
    last_seen: tuple[float, int] | None = None  # (time, load) at the previous decision
    growth: float = 0.0  # the load's recent growth, requests per second (smoothed, >= 0)

    def decide(self, now: float, s: PoolSignals) -> int:
        cfg = self.config
        current = s.replicas
        desired = min(max(current, cfg.min_replicas), cfg.max_replicas)
        self._track_growth(now, s.load)
        need = math.ceil((s.load + self.growth * cfg.growth_lookahead_s) / cfg.target_load)
        overloaded = s.kv_usage >= cfg.kv_high or (
            cfg.ttft_slo_s is not None and s.ttft_p99_s is not None and s.ttft_p99_s > cfg.ttft_slo_s
        )
        if current == 0 and s.load > 0:
            # Scale from zero at once: a request is held in the router until a replica is up.
            desired, self.reason = max(desired, 1, min(need, cfg.max_replicas)), "scale from zero"
        elif (
            need > current or (overloaded and s.load > 0)
        ) and now - self.last_up_at >= cfg.scale_up_cooldown_s:
            grow = max(need, current + 1)
            desired = max(desired, min(grow, cfg.max_replicas))
            self.reason = "overloaded" if overloaded and need <= current else "load"
        if desired > current:
            self.last_up_at = now
            self.low_since = None
            self.desired = desired
            return desired
        # Down: the load fits in one replica fewer at `down_ratio` of its target, and has for long enough.
        fits = s.load <= cfg.down_ratio * cfg.target_load * (current - 1) and not overloaded
        if current > cfg.min_replicas and fits:
            if self.low_since is None:
                self.low_since = now
            elif now - self.low_since >= cfg.scale_down_after_s:
                # To what the load needs at `down_ratio` of the target (at least one while it is not 0).
                fitted = math.ceil(s.load / (cfg.down_ratio * cfg.target_load))
                desired = max(cfg.min_replicas, fitted, 1 if s.load else 0)
                step = current - 1 if self.config.down_step is None else self.config.down_step
                desired = min(current - 1, max(desired, current - step))
                self.low_since = now  # the next step down waits as long again
                self.reason = "idle" if s.load == 0 else "low load"
        else:
            self.low_since = None
        self.desired = desired
        return desired

    def _track_growth(self, now: float, load: int) -> None:
        if self.last_seen is not None and now > self.last_seen[0]:
            rate = (load - self.last_seen[1]) / (now - self.last_seen[0])
            self.growth = max(0.0, 0.5 * self.growth + 0.5 * rate)
        self.last_seen = (now, load)


@dataclass(slots=True)
class PoolAutoscaler:
    """One autoscaler per role: prefill and decode apart under a PD strategy, one 'both' pool otherwise."""

    configs: Mapping[str, AutoscalerConfig]
    scalers: dict[str, Autoscaler] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scalers = {role: Autoscaler(cfg) for role, cfg in self.configs.items()}

    def decide(self, now: float, signals: Mapping[str, PoolSignals]) -> dict[str, int]:
        return {role: self.scalers[role].decide(now, signals[role]) for role in self.scalers}

    def desired(self) -> dict[str, int | None]:
        return {role: scaler.desired for role, scaler in self.scalers.items()}


def pool_signals(
    workers: Iterable[Worker], queued: int, starting: int, ttft_p99_s: float | None = None
) -> PoolSignals:
    """The pool as the autoscaler sees it: engines up and not draining plus those starting; the load is
    what the router holds plus, per engine, the larger of its in-flight count and its last load report."""
    serving = [w for w in workers if not w.draining]
    waiting = running = 0
    kv = 0.0
    for w in serving:
        load = w.load
        if load is not None and load.waiting + load.running >= w.in_flight:
            waiting += load.waiting
            running += load.running
        else:
            running += w.in_flight
        kv = max(kv, load.kv_usage if load is not None else 0.0)
    return PoolSignals(len(serving) + starting, queued, waiting, running, kv, ttft_p99_s)


def recent_ttft_p99(
    samples: Iterable[tuple[float, float]], now: float, window_s: float = 30.0, min_samples: int = 20
) -> float | None:
    """The p99 of the TTFTs (`(when, seconds)` pairs) seen in the last `window_s`, or None with fewer
    than `min_samples` of them: the TTFT signal, from the router's recent requests or the simulator's."""
    recent = sorted(ttft for at, ttft in samples if now - at <= window_s)
    if len(recent) < min_samples:
        return None
    return recent[min(len(recent) - 1, math.ceil(0.99 * len(recent)) - 1)]


def idlest(workers: Iterable[Worker]) -> Worker | None:
    """The worker with the least in flight (then the least recent load), the one to drain first."""

    def busy(w: Worker) -> tuple[int, int]:
        reported = 0 if w.load is None else w.load.waiting + w.load.running
        return (w.in_flight, reported)

    return min(workers, key=busy, default=None)
