"""Each routing policy's exact picks on scripted loads: no sockets, scripted randomness, fake clocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from microserve.router.policies import (
    POLICIES,
    ConsistentHash,
    LeastConnections,
    LeastLoaded,
    PowerOfTwo,
    PrefixAware,
    Random,
    RoundRobin,
    Weighted,
    make_policy,
)
from microserve.router.prefix_index import PrefixIndex
from microserve.router.request import Route, RoutedRequest
from microserve.router.workers import Worker, WorkerSpec
from tests.clocks import Clock


def workers(n: int = 3, weights: Sequence[int] | None = None) -> list[Worker]:
    weights = weights or [1] * n
    return [Worker(WorkerSpec(f"http://w{i}:1", weight=w)) for i, w in enumerate(weights)]


def request(session: str | None = None, prompt: str = "hi") -> RoutedRequest:
    return RoutedRequest(Route.COMPLETIONS, {"prompt": prompt}, b"", session_key=session)


def names(picks: Sequence[Worker]) -> list[str]:
    return [w.url.removeprefix("http://").removesuffix(":1") for w in picks]


def dispatch(policy: Any, pool: list[Worker], req: RoutedRequest | None = None) -> Worker:
    """Pick and count it in flight, as the router does at dispatch."""
    worker = policy.select(pool, req or request())
    worker.acquire()
    return worker


class ScriptedRng:
    """Stands in for random.Random: returns the scripted values in order."""

    def __init__(self, *values: Any) -> None:
        self.values = list(values)

    def randrange(self, n: int) -> int:
        value = self.values.pop(0)
        assert 0 <= value < n
        return value

    def sample(self, population: Sequence[int], k: int) -> list[int]:
        value = self.values.pop(0)
        assert len(value) == k and all(v in population for v in value)
        return list(value)


def test_round_robin_cycles_in_pool_order() -> None:
    pool = workers()
    policy = RoundRobin()
    assert names([policy.select(pool, request()) for _ in range(7)]) == ["w0", "w1", "w2"] * 2 + ["w0"]


def test_round_robin_turns_each_pool_on_its_own() -> None:
    # A PD request picks from the prefill pool then the decode pool: each pool must still rotate fully.
    pool = workers(4)
    prefill, decode = pool[:2], pool[2:]
    policy = RoundRobin()
    picks = [names([policy.select(prefill, request()), policy.select(decode, request())]) for _ in range(3)]
    assert picks == [["w0", "w2"], ["w1", "w3"], ["w0", "w2"]]


def test_random_uses_its_rng() -> None:
    pool = workers()
    policy = Random(rng=ScriptedRng(2, 0, 2, 1))  # type: ignore[arg-type]
    assert names([policy.select(pool, request()) for _ in range(4)]) == ["w2", "w0", "w2", "w1"]


def test_least_connections_counts_at_dispatch() -> None:
    pool = workers()
    policy = LeastConnections()
    # No response ever comes back: a burst still spreads, because in flight counts from the pick.
    assert names([dispatch(policy, pool) for _ in range(3)]) == ["w0", "w2", "w1"]
    pool[2].release()
    assert names([dispatch(policy, pool)]) == ["w2"]
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 5, 2, 3
    assert names([policy.select(pool, request())]) == ["w1"]


def test_least_loaded_reads_fresh_reports_queue_then_kv() -> None:
    clock = Clock(100.0)
    pool = workers()
    pool[0].report_load(waiting=2, running=1, kv_usage=0.1, at=100.0)
    pool[1].report_load(waiting=0, running=1, kv_usage=0.5, at=100.0)
    pool[2].report_load(waiting=0, running=0, kv_usage=0.95, at=100.0)  # nearly full: ranks last
    policy = LeastLoaded(max_staleness_s=2.0, clock=clock)
    assert names([dispatch(policy, pool)]) == ["w1"]
    assert names([dispatch(policy, pool)]) == ["w1"]  # 1 running + 1 sent since the report = 2 < 3
    # Now w0 and w1 both queue 3; lower KV use breaks the tie.
    assert names([dispatch(policy, pool)]) == ["w0"]
    pool[1].report_load(waiting=0, running=0, kv_usage=0.2, at=101.0)  # a report resets what was sent
    assert names([policy.select(pool, request())]) == ["w1"]


def test_least_loaded_falls_back_to_in_flight_when_a_report_is_stale() -> None:
    clock = Clock(100.0)
    pool = workers(2)
    pool[0].report_load(waiting=0, running=0, kv_usage=0.0, at=100.0)
    pool[1].report_load(waiting=9, running=9, kv_usage=0.9, at=100.0)
    pool[0].in_flight, pool[1].in_flight = 4, 1
    policy = LeastLoaded(max_staleness_s=2.0, clock=clock)
    assert names([policy.select(pool, request())]) == ["w0"]
    clock.now = 102.5  # both reports are now too old to trust
    assert names([policy.select(pool, request())]) == ["w1"]
    pool[1].load = None
    clock.now = 100.0
    assert names([policy.select(pool, request())]) == ["w1"]  # one missing report is enough


def test_weighted_round_robin_is_smooth() -> None:
    pool = workers(weights=[5, 1, 1])
    policy = Weighted(mode="round_robin")
    # nginx's smooth weighted round robin spreads the heavy worker's turns out.
    picks = names([policy.select(pool, request()) for _ in range(14)])
    assert picks == ["w0", "w0", "w1", "w0", "w2", "w0", "w0"] * 2


def test_weighted_least_connections_divides_by_weight() -> None:
    pool = workers(weights=[3, 1])
    policy = Weighted(mode="least_connections")
    picks = names([dispatch(policy, pool) for _ in range(8)])
    # Loads per weight: w0 takes three for each one w1 takes; ties go to the heavier worker.
    assert picks == ["w0", "w1", "w0", "w0", "w0", "w1", "w0", "w0"]
    with pytest.raises(ValueError, match="mode"):
        Weighted(mode="fastest")


RING = {"http://w0:1#0": 100, "http://w1:1#0": 200, "http://w2:1#0": 300, "alice": 150, "bob": 350}


def test_consistent_hash_sticks_sessions_and_moves_only_a_removed_workers_keys() -> None:
    pool = workers()
    policy = ConsistentHash(virtual_nodes=1, hash_fn=RING.__getitem__)
    assert names([policy.select(pool, request("alice")) for _ in range(3)]) == ["w1"] * 3
    assert names([policy.select(pool, request("bob"))]) == ["w0"]  # past the last point: wraps around
    without_w1 = [pool[0], pool[2]]
    assert names([policy.select(without_w1, request("alice"))]) == ["w2"]  # next clockwise
    assert names([policy.select(without_w1, request("bob"))]) == ["w0"]  # unchanged


def test_consistent_hash_bounds_the_load_of_a_hot_session() -> None:
    pool = workers()
    policy = ConsistentHash(virtual_nodes=1, load_factor=1.25, hash_fn=RING.__getitem__)
    picks = names([dispatch(policy, pool, request("alice")) for _ in range(6)])
    # Capacity is ceil(1.25 * (in flight + 1) / 3): alice stays on w1 while it holds less than that,
    # and spills to the next worker clockwise (w2) when it would not; w1 never holds more than its cap.
    assert picks == ["w1", "w2", "w1", "w2", "w1", "w2"]
    assert [w.in_flight for w in pool] == [0, 3, 3]
    pool[1].in_flight = pool[2].in_flight = 9  # both busy with other sessions: the walk reaches w0
    assert names([policy.select(pool, request("alice"))]) == ["w0"]


def test_consistent_hash_without_a_session_goes_round_robin() -> None:
    pool = workers()
    policy = ConsistentHash(virtual_nodes=1, hash_fn=RING.__getitem__)
    assert names([policy.select(pool, request(None)) for _ in range(4)]) == ["w0", "w1", "w2", "w0"]


def test_consistent_hash_with_the_real_hash_spreads_keys_and_is_stable() -> None:
    pool = workers()
    policy = ConsistentHash()
    owners = {key: policy.select(pool, request(key)).url for key in (f"user-{i}" for i in range(300))}
    counts = sorted(list(owners.values()).count(w.url) for w in pool)
    assert counts[0] > 50  # 64 virtual nodes each: no worker starves
    assert owners == {key: policy.select(pool, request(key)).url for key in owners}


def test_power_of_two_compares_its_two_samples() -> None:
    pool = workers(4)
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight, pool[3].in_flight = 3, 0, 1, 1
    rng = ScriptedRng((0, 2), (2, 3), (3, 1), (0, 0 + 3))
    policy = PowerOfTwo(rng=rng, clock=Clock(100.0))  # type: ignore[arg-type]
    picks = names([policy.select(pool, request()) for _ in range(4)])
    assert picks == ["w2", "w2", "w1", "w3"]  # the less loaded of each pair; a tie keeps the first


def test_power_of_two_prefers_fresh_engine_reports() -> None:
    clock = Clock(100.0)
    pool = workers(2)
    pool[0].report_load(waiting=5, running=1, kv_usage=0.5, at=100.0)
    pool[1].report_load(waiting=0, running=1, kv_usage=0.5, at=100.0)
    pool[0].in_flight, pool[1].in_flight = 0, 3  # this router's view disagrees with the engines'
    policy = PowerOfTwo(rng=ScriptedRng((0, 1), (0, 1)), clock=clock)  # type: ignore[arg-type]
    assert names([policy.select(pool, request())]) == ["w1"]
    clock.now = 200.0
    assert names([policy.select(pool, request())]) == ["w0"]


SYSTEM = "You are a helpful assistant. " * 4  # 116 characters: 29 blocks of 4


def test_prefix_aware_follows_the_longest_cached_prefix() -> None:
    pool = workers()
    policy = PrefixAware(block_size=4, min_match=16, balance_abs=2, balance_rel=1.5)
    first = "Tell me about the history of Rome, please."
    assert names([policy.select(pool, request(prompt=first))]) == ["w0"]  # cold: the idlest, w0 first
    assert names([policy.select(pool, request(prompt="a different prompt altogether"))]) == ["w1"]
    # The same conversation, one turn later: it returns to w0 where its prefix is.
    assert names([policy.select(pool, request(prompt=first + " And of Carthage?"))]) == ["w0"]
    # Too short a match (8 characters < min_match) does not decide; the idlest does.
    assert names([policy.select(pool, request(prompt="Tell me something else"))]) == ["w2"]


def test_prefix_aware_shared_system_prompt_does_not_pin_everything() -> None:
    pool = workers(2)
    policy = PrefixAware(block_size=4, min_match=16, balance_abs=2, balance_rel=1.5)
    assert names([dispatch(policy, pool, request(prompt=SYSTEM + "q1"))]) == ["w0"]
    # Only w0 has seen the system prompt: it wins while the fleet stays balanced…
    assert names([dispatch(policy, pool, request(prompt=SYSTEM + "q2"))]) == ["w0"]
    assert names([dispatch(policy, pool, request(prompt=SYSTEM + "q3"))]) == ["w0"]
    # …then w0 has 3 in flight and w1 none (3 - 0 > 2 and 3 > 0 * 1.5): the idle worker gets it.
    assert names([dispatch(policy, pool, request(prompt=SYSTEM + "q4"))]) == ["w1"]
    # Both hold the system prompt now, so it no longer decides: the less busy one does.
    assert names([dispatch(policy, pool, request(prompt=SYSTEM + "q5"))]) == ["w1"]
    # w0 also saw SYSTEM + "q2", but "q2" is less than a block: both hold the same prefix, load decides
    # (a tie, taken in turn)…
    long_turn = SYSTEM + "q2" + " and a long follow-up question about it"
    pool[0].in_flight = pool[1].in_flight = 1
    assert names([dispatch(policy, pool, request(prompt=long_turn))]) == ["w1"]
    # …and the next turn of that conversation follows it, 40 characters ahead of w0's match.
    pool[0].in_flight = 0
    assert names([dispatch(policy, pool, request(prompt=long_turn + " again"))]) == ["w1"]


def test_prefix_aware_judges_overload_per_worker() -> None:
    pool = workers()
    policy = PrefixAware(block_size=4, min_match=16, balance_abs=2, balance_rel=1.5)
    conversation = SYSTEM + "Tell me about Rome."
    assert names([dispatch(policy, pool, request(prompt=conversation))]) == ["w0"]
    # w1 is overloaded (5 in flight, the idle w2 none), but w0 is not (1 - 0 <= 2): the conversation's
    # next turn stays where its prefix is, where a fleet-wide check would have sent it to w2.
    pool[1].in_flight = 5
    assert names([dispatch(policy, pool, request(prompt=conversation + " And Carthage?"))]) == ["w0"]
    # Now w0 is overloaded too (3 - 0 > 2 and 3 > 0 * 1.5): the next turn leaves it for the idle w2.
    pool[0].in_flight = 3
    assert names([dispatch(policy, pool, request(prompt=conversation + " And Athens?"))]) == ["w2"]


def test_prefix_aware_an_overloaded_worker_passes_its_requests_to_the_best_fit_match() -> None:
    pool = workers()
    policy = PrefixAware(block_size=4, min_match=16, balance_abs=2, balance_rel=1.5)
    first, second = SYSTEM + "Tell me about Rome.", SYSTEM + "Tell me about Egypt."
    assert names([policy.select(pool, request(prompt=first))]) == ["w0"]
    policy.index.insert(policy.index.hashes(second), "http://w1:1")  # another conversation went to w1
    # w0 holds the conversation but is overloaded (4 - 0 > 2); of the others w1 holds the system prompt
    # (29 blocks) and w2 nothing: w1 gets it although w2 is idler.
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 4, 1, 0
    assert names([policy.select(pool, request(prompt=first + " And Carthage?"))]) == ["w1"]


def test_prefix_aware_defaults_keep_a_conversation_after_one_short_user_turn() -> None:
    pool = workers(2)
    policy = PrefixAware()  # 64-character blocks, min_match 128
    system = ("You are a careful assistant who answers in plain words. " * 12)[:640]  # 10 blocks
    turn_a = (  # 163 characters, about a user turn of the routing-quality benchmark (32 words)
        "Tell me how the Romans built their roads, which materials they used, how long they lasted, "
        "and which of them are still in use today across Italy, France and Spain."
    )
    turn_b = "Explain how a steam engine works, who improved it, and why it mattered for the railways."
    assert names([dispatch(policy, pool, request(prompt=system + turn_a))]) == ["w0"]
    policy.index.insert(policy.index.hashes(system + turn_b), "http://w1:1")  # another conversation
    assert policy.index.match(policy.index.hashes(system + turn_a)) == {"http://w0:1": 12, "http://w1:1": 10}
    # The second turn of the first conversation: w0 holds 2 more blocks than w1 (128 characters of
    # the first user turn, past the shared system prompt), so it stays on w0 although w0 is busier;
    # the former default (min_match 256) sent it to the idle w1.
    follow_up = system + turn_a + " They were built in layers of stone. Which one is the oldest?"
    assert names([dispatch(policy, pool, request(prompt=follow_up))]) == ["w0"]


def test_prefix_aware_on_token_ids_uses_the_request_ids() -> None:
    pool = workers(2)
    policy = PrefixAware(tokens=True, block_size=2, min_match=4)
    assert policy.needs_prompt_ids
    req = request(prompt="ignored")
    req.prompt_ids = [1, 2, 3, 4, 5, 6]
    assert names([policy.select(pool, req)]) == ["w0"]
    again = request(prompt="also ignored")
    again.prompt_ids = [1, 2, 3, 4, 9, 9]
    assert names([policy.select(pool, again)]) == ["w0"]  # 2 blocks = 4 tokens in common


def test_prefix_index_is_bounded_and_evicts_least_recently_used_leaves_first() -> None:
    index = PrefixIndex(block_size=2, max_blocks=4)
    a, b = index.hashes("aabbcc"), index.hashes("xxyy")
    assert len(a) == 3 and len(b) == 2 and index.hashes("aabbc") == a[:2]  # partial blocks not indexed
    index.insert(a, "w0")
    index.insert(b, "w1")  # 5 blocks > 4: the oldest goes, which is a's leaf ("cc"), not its root
    assert len(index) == 4
    assert index.match(a) == {"w0": 2}
    assert index.match(b) == {"w1": 2}
    index.insert(index.hashes("zz"), "w1")  # a was touched before b: a's "bb" goes next
    assert index.match(a) == {"w0": 1}
    index.forget_worker("w1")
    assert index.match(b) == {} and len(index) == 1


def test_make_policy_by_name_with_options() -> None:
    assert set(POLICIES) == {
        "round_robin",
        "random",
        "least_connections",
        "least_loaded",
        "weighted",
        "consistent_hash",
        "power_of_two",
        "prefix_aware",
    }
    policy = make_policy("prefix_aware", {"min_match": 128})
    assert policy.describe()["options"]["min_match"] == 128
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="bad options"):
        make_policy("round_robin", {"speed": 1})
    with pytest.raises(ValueError, match="cannot be set"):
        make_policy("random", {"rng": 1})
