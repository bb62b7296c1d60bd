"""Simulated time: the loop's clock jumps to the next timer when idle, never while a thread or a
socket is busy, and it is the process clock while it runs."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from parrot_actors import clock, simtime


def test_sleeps_take_exact_simulated_time_and_no_wall_time():
    async def main() -> tuple[float, float, float]:
        start = clock.now()
        await asyncio.sleep(250.0)
        mid = clock.now()
        await asyncio.gather(asyncio.sleep(1.5), asyncio.sleep(0.25))
        return start, mid, clock.now()

    wall = time.perf_counter()
    assert simtime.run(main()) == (0.0, 250.0, 251.5)
    assert time.perf_counter() - wall < 5.0
    assert not clock.simulated()  # the real clock is back
    assert abs(clock.now() - time.monotonic()) < 1.0


def test_a_worker_thread_takes_no_simulated_time_and_time_waits_for_it():
    async def main() -> tuple[float, float]:
        timer = asyncio.ensure_future(asyncio.sleep(10.0))
        # The thread sleeps 0.2 s of real time while a 10 s timer is pending: the clock must
        # not jump to the timer before the thread is done.
        await asyncio.to_thread(time.sleep, 0.2)
        during = clock.now()
        await timer
        return during, clock.now()

    assert simtime.run(main()) == (0.0, 10.0)


def test_http_over_loopback_is_deterministic_in_simulated_time():
    async def main() -> list[float]:
        async def handler(request: web.Request) -> web.Response:
            await asyncio.sleep(0.125)
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        times = []
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                start = clock.now()
                async with http.get(f"http://127.0.0.1:{port}/") as resp:
                    assert await resp.text() == "ok"
                times.append(clock.now() - start)
        await runner.cleanup()
        return times

    assert simtime.run(main()) == [0.125] * 20


def test_host_work_is_measured_beside_simulated_time():
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, simtime.SimEventLoop)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.05:  # 50 ms of our own work on the loop
            pass
        await asyncio.sleep(1.0)
        return clock.now(), loop.host_busy_s

    now, busy = simtime.run(main())
    assert now == 1.0 and busy >= 0.05


def test_run_refuses_a_running_loop_and_nesting():
    async def inner() -> None:
        simtime.run(asyncio.sleep(0))

    with pytest.raises(RuntimeError, match="running event loop"):
        asyncio.run(inner())
    with pytest.raises(RuntimeError, match="running event loop"):
        simtime.run(inner())
