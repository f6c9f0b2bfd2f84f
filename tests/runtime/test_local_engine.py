"""The local engine's serving thread: the stage's calls run on the thread that called `serve`, in order, while the
driver runs on a helper; an interrupt or a finished driver leaves nothing queued to run and no driver waiting."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest
import torch

from runtime.engine import _ServingThread


def test_calls_run_in_order_on_the_serving_thread_with_gradients_on():
    stage, ran = _ServingThread(), []

    def call(i):
        ran.append((i, threading.current_thread(), torch.is_grad_enabled()))
        return i * i

    def driver():
        futures = [stage.submit(call, i) for i in range(5)]
        return [f.result() for f in futures], threading.current_thread()

    with torch.no_grad():  # the caller's grad mode does not reach the stage
        (results, driver_thread) = stage.serve(driver)
    assert results == [0, 1, 4, 9, 16]
    assert [i for i, _, _ in ran] == list(range(5))
    assert {t for _, t, _ in ran} == {threading.current_thread()} and driver_thread is not threading.current_thread()
    assert all(grad for _, _, grad in ran)
    with pytest.raises(CancelledError):  # served: later calls are cancelled, never run inline
        stage.submit(call, 9).result()


def test_a_stage_error_reaches_the_driver_and_a_driver_error_the_caller():
    stage = _ServingThread()

    def driver():
        with pytest.raises(ValueError, match="stage failed"):
            stage.submit(lambda: (_ for _ in ()).throw(ValueError("stage failed"))).result()
        raise OSError("driver failed")

    with pytest.raises(OSError, match="driver failed"):
        stage.serve(driver)


def test_an_interrupt_in_a_call_stops_serving_and_cancels_what_is_queued():
    stage, ran, driver_saw = _ServingThread(), [], []
    queued = threading.Event()

    def interrupted():
        queued.wait(5)
        raise KeyboardInterrupt

    def driver():
        first = stage.submit(interrupted)
        second = stage.submit(ran.append, "second")
        queued.set()
        for future in (first, second):
            try:
                future.result()
            except BaseException as err:
                driver_saw.append(type(err).__name__)

    with pytest.raises(KeyboardInterrupt):
        stage.serve(driver)
    assert ran == []  # the window queued behind the interrupted one never runs
    assert driver_saw == ["KeyboardInterrupt", "CancelledError"]  # and the driver did not wait on it


def test_a_call_from_the_serving_thread_itself_is_refused():
    stage = _ServingThread()

    def driver():
        return stage.submit(lambda: stage.submit(int)).result()

    with pytest.raises(RuntimeError, match="would wait on itself"):
        stage.serve(driver)


def test_before_serving_a_call_runs_at_once():
    assert _ServingThread().submit(max, 3, 4).result() == 4
