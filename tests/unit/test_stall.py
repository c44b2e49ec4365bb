"""Stalls end with a message that says what the job waited on, instead of a silent hang."""
import threading
import time

import pytest

from jobs.train.stall import DataWatchdog, StallError, cluster_waits_on


def test_a_loop_waiting_on_data_past_the_timeout_is_stopped_with_the_reason(capsys):
    with pytest.raises(StallError, match=r"waited \d+ s for the next training batch .*stall timeout 0\.5 s"):
        with DataWatchdog(0.5) as w:
            for _ in range(400):  # a consumer blocked on its next batch (Python-level wait, as Ray Data's)
                time.sleep(0.01)
    assert "[stall]" in capsys.readouterr().out
    assert w is not None


def _watchers() -> int:
    return sum(t.name == "data-watchdog" for t in threading.enumerate())


def test_a_loop_that_keeps_receiving_batches_is_left_alone(capsys):
    with DataWatchdog(0.5) as w:
        assert _watchers() == 1  # it is watching
        for _ in range(150):  # 1.5 s, three timeouts, with a batch every 10 ms: never stopped
            time.sleep(0.01)
            w.tick()
    deadline = time.monotonic() + 5
    while _watchers() and time.monotonic() < deadline:  # the watcher ends with the block
        time.sleep(0.05)
    assert _watchers() == 0 and "[stall]" not in capsys.readouterr().out
    with DataWatchdog(0):  # 0: off, no watcher however long the wait
        assert _watchers() == 0
        time.sleep(0.2)


def test_the_diagnosis_names_free_and_total_resources(ray_session):
    ray = ray_session
    total = int(ray.cluster_resources()["CPU"])
    # The session's Ray is shared with other tests, whose actors may still hold CPUs: take what is free.
    free = ray.available_resources().get("CPU", 0)
    assert free >= 1, f"the shared Ray session has no free CPU to take ({free} of {total})"

    @ray.remote(num_cpus=free)
    def hog():
        time.sleep(60)

    @ray.remote(num_cpus=1)
    def starved():
        return 1

    held, waiting = hog.remote(), starved.remote()  # `starved` can never be scheduled while `hog` runs
    try:
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == 0, "the hog task never started"
        assert f"free 0 of {total} CPU" in cluster_waits_on()
    finally:
        ray.cancel(held, force=True)
        ray.cancel(waiting, force=True)


def test_tune_watchdog_fires_after_the_timeout_and_on_interrupt():
    from jobs.tune.watchdog import StallWatchdog

    w = StallWatchdog(0.2)
    assert not w.stop_all()
    w("trial", {})
    time.sleep(0.3)
    assert w.stop_all() and "no trial reported progress" in w.stalled
    with pytest.raises(StallError):
        w.raise_if_stalled()
    w2 = StallWatchdog(None)
    assert not w2.stop_all()
    w2.interrupt.set()
    assert w2.stop_all() and w2.stalled is None
    import pickle

    w3 = pickle.loads(pickle.dumps(w2))  # Tune pickles its run config
    assert not w3.interrupt.is_set()
