"""The policy core: exact placements for caps, task groups, prefix affinity, starvation."""

from __future__ import annotations

from parrot_actors.scheduler.policy import (
    CallInfo,
    EngineState,
    Placement,
    schedule_app,
    schedule_fcfs,
)


def lat(i: int, **kw) -> CallInfo:
    return CallInfo(call_id=i, objective="latency", seq=i, **kw)


def thr(i: int, **kw) -> CallInfo:
    return CallInfo(call_id=i, objective="throughput", seq=i, **kw)


def eng(name: str, **kw) -> EngineState:
    return EngineState(name=name, model="m", free_blocks=1000, **kw)


def test_latency_cap_respected():
    engines = [eng("a", running_calls=2, running_latency=2), eng("b")]
    out = schedule_app([lat(1), lat(2), lat(3)], engines, latency_cap=2)
    assert out == [Placement(1, "b"), Placement(2, "b")]


def test_latency_goes_to_smallest_batch_and_first():
    engines = [eng("a", running_calls=10), eng("b", running_calls=3)]
    out = schedule_app([thr(1), lat(2)], engines)
    assert out == [Placement(2, "b"), Placement(1, "b")]


def test_task_group_dispatched_together_others_balance():
    engines = [eng("a"), eng("b")]
    ready = [
        thr(1, task_group=9),
        thr(2),
        thr(3, task_group=9),
        thr(4, task_group=9),
        thr(5, task_group=9),
    ]
    out = schedule_app(ready, engines)
    assert out == [
        Placement(1, "a"),
        Placement(3, "a"),
        Placement(4, "a"),
        Placement(5, "a"),
        Placement(2, "b"),
    ]


def test_task_group_spills_when_engine_is_full():
    engines = [eng("a", running_calls=2), eng("b")]
    ready = [thr(i, task_group=1) for i in range(1, 5)]
    out = schedule_app(ready, engines, throughput_cap=3)
    # The first member goes to the least loaded engine (b) and the rest follow it.
    assert out == [Placement(1, "b"), Placement(2, "b"), Placement(3, "b"), Placement(4, "a")]


def test_prefix_affinity_up_to_a_load_bound():
    engines = [eng("a", running_calls=5, prefixes=("k",)), eng("b")]
    assert schedule_app([lat(1, prefix_keys=("k",))], engines) == [Placement(1, "a")]
    busy = [eng("a", running_calls=9, prefixes=("k",)), eng("b")]
    assert schedule_app([lat(1, prefix_keys=("k",))], busy) == [Placement(1, "b")]
    assert schedule_app([lat(1, prefix_keys=("k",))], busy, affinity_load_bound=9) == [
        Placement(1, "a")
    ]


def test_calls_sharing_a_prefix_in_one_round_stay_together():
    # No engine holds the prefix yet: the first sharer picks one, the others follow it (up to
    # the load bound); a call with another prefix still balances.
    ready = [lat(i, prefix_keys=("sys",)) for i in range(1, 5)] + [lat(5, prefix_keys=("x",))]
    out = schedule_app(ready, [eng("a"), eng("b")], affinity_load_bound=8)
    assert out == [
        Placement(1, "a"),
        Placement(2, "a"),
        Placement(3, "a"),
        Placement(4, "a"),
        Placement(5, "b"),
    ]
    bounded = schedule_app(ready[:4], [eng("a"), eng("b")], affinity_load_bound=1)
    assert bounded == [Placement(1, "a"), Placement(2, "a"), Placement(3, "b"), Placement(4, "a")]


def test_no_starvation_of_throughput_under_latency_stream():
    engines = [eng("a", running_calls=1)]
    fresh = schedule_app([thr(1, waited_s=0.0), lat(2), lat(3)], engines, throughput_cap=2)
    assert fresh == [Placement(2, "a"), Placement(3, "a")]
    starving = schedule_app(
        [thr(1, waited_s=6.0), lat(2), lat(3)], engines, throughput_cap=2, max_throughput_wait_s=5.0
    )
    assert starving == [Placement(1, "a"), Placement(2, "a"), Placement(3, "a")]
    # A steady stream: each round two new latency calls; the throughput call waits 1 s/round.
    placed_at = None
    for rnd in range(10):
        ready = [thr(1, waited_s=float(rnd)), lat(100 + 2 * rnd), lat(101 + 2 * rnd)]
        out = schedule_app(ready, engines, throughput_cap=2, max_throughput_wait_s=5.0)
        if Placement(1, "a") in out:
            placed_at = rnd
            break
    assert placed_at == 5


def test_kv_room_and_models():
    engines = [
        EngineState(name="a", model="m", free_blocks=2, block_size=16),
        EngineState(name="b", model="m", free_blocks=100, block_size=16, running_calls=3),
        EngineState(name="c", model="other", free_blocks=500),
    ]
    big = lat(1, prompt_tokens=500, max_new_tokens=100, model="m")
    assert schedule_app([big], engines) == [Placement(1, "b")]
    assert schedule_app([lat(2, model="nope")], engines) == []
    assert schedule_app([lat(3, model="other")], engines) == [Placement(3, "c")]


def test_fcfs_is_arrival_order_least_loaded():
    engines = [eng("a", running_calls=1), eng("b")]
    out = schedule_fcfs([thr(3), lat(1), lat(2)], engines)
    assert out == [Placement(1, "b"), Placement(2, "a"), Placement(3, "b")]


def test_deterministic():
    engines = [eng("a"), eng("b"), eng("c")]
    ready = [thr(i, task_group=i % 3) if i % 2 else lat(i) for i in range(30)]
    assert schedule_app(ready, engines) == schedule_app(list(reversed(ready)), engines)
