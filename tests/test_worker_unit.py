"""Pure parts of the worker, without a server."""

from aquapeer.worker import LoopLag


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
