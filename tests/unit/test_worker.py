"""Pure parts of the worker, without a server."""

import asyncio

from aquapeer.worker import LoopLag, cancel_and_wait


def test_loop_lag_reports_the_worst_second_in_the_window():
    lag = LoopLag(window_s=60)
    lag.record(1000.2, 0.004)
    lag.record(1000.7, 0.030)
    lag.record(1001.1, 0.002)
    assert lag.max_ms(1001.5) == 30.0


def test_loop_lag_forgets_what_left_the_window():
    lag = LoopLag(window_s=60)
    lag.record(1000.0, 0.5)
    lag.record(1070.0, 0.001)
    assert lag.max_ms(1070.5) == 1.0


def test_cancel_and_wait_ends_a_task_that_lost_a_cancel():
    async def loses_the_first_cancel():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # as Python 3.11's wait_for does when what it waited for finished meanwhile
        await asyncio.sleep(60)

    async def main():
        task = asyncio.create_task(loses_the_first_cancel())
        await asyncio.sleep(0)
        async with asyncio.timeout(10):
            await cancel_and_wait([task])
        return task.cancelled()

    assert asyncio.run(main())
