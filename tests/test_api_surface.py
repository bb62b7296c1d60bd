"""The public factories, the call lifecycle's transitions, and settings that must not
contradict each other."""

from __future__ import annotations

import pytest

import parrot_actors as pa
from parrot_actors.errors import InvalidRequestError
from parrot_actors.server.client import RemoteRuntime
from parrot_actors.variables.graph import Piece, SemanticCall
from parrot_actors.variables.lifecycle import CallState, advance, finished
from tests.conftest import tiny_config


def test_factories_and_their_runtime_aliases():
    rt = pa.connect("http://127.0.0.1:1/", api_key="k-0123456789")
    assert isinstance(rt, RemoteRuntime) and rt.url == "http://127.0.0.1:1"
    assert pa.Runtime.connect is pa.connect
    pytest.importorskip("ray")
    from parrot_actors.ray.client import RayRuntime

    made = pa.ray("127.0.0.1:6379", engines=2)  # nothing connects before `async with`
    assert isinstance(made, RayRuntime) and made.address == "127.0.0.1:6379"
    import parrot_actors.ray as ray_package

    # Importing the subpackage makes it `pa.ray`; calling it is still the factory.
    assert isinstance(pa.ray("auto"), RayRuntime) and isinstance(ray_package("auto"), RayRuntime)
    assert isinstance(pa.Runtime.ray("auto"), RayRuntime)


def test_the_call_lifecycle_refuses_what_it_does_not_have():
    call = SemanticCall("f", [Piece("text", text="x"), Piece("output", var=pa.Variable())])
    assert call.state is CallState.PENDING and not finished(call)
    with pytest.raises(ValueError, match="no transition pending -> running"):
        advance(call, CallState.RUNNING)
    assert advance(call, CallState.READY) and advance(call, CallState.RUNNING)
    assert advance(call, CallState.RETRY) and advance(call, CallState.READY)
    assert advance(call, CallState.RUNNING) and advance(call, CallState.DONE)
    assert finished(call) and advance(call, CallState.FAILED) is False  # final: refused
    assert call.state is CallState.DONE and str(call.state) == "done"


async def test_engine_and_scheduler_prefix_caching_cannot_contradict():
    off = pa.SchedulerConfig(automatic_prefix_caching=False)
    clash = pa.Runtime(engines=[tiny_config(prefix_caching=True)], scheduler=off)
    with pytest.raises(InvalidRequestError, match="prefix_caching=True.*=False"):
        await clash.start()
    async with pa.Runtime(engines=[tiny_config()], scheduler=off) as rt:
        assert rt.engines[0].core.prefix_caching is False  # unset: the scheduler's value
    async with pa.Runtime(engines=[tiny_config(prefix_caching=False)]) as rt:
        assert rt.engines[0].core.prefix_caching is False  # the scheduler leaves it
    async with pa.Runtime(engines=[tiny_config()]) as rt:
        assert rt.engines[0].core.prefix_caching is True  # both unset: on
