"""SLO mode's rules (serve/slo.py) with an injected clock: the η ladder and its floor, stepping down under
load and back up with hysteresis, one step per check, the window restarting after a step."""
import pytest

from serve.slo import EtaGovernor, eta_ladder

TABLE = [{"eta": 0.9, "gflops": 3.0, "accuracy": 0.80}, {"eta": 0.7, "gflops": 2.5, "accuracy": 0.79},
         {"eta": 0.5, "gflops": 2.0, "accuracy": 0.77}, {"eta": 0.3, "gflops": 1.5, "accuracy": 0.72},
         {"eta": 0.1, "gflops": 1.2, "accuracy": 0.60}]


def test_ladder_and_floor():
    assert eta_ladder(0.9, TABLE) == [0.9, 0.7, 0.5, 0.3, 0.1]
    assert eta_ladder(0.8, TABLE) == [0.8, 0.7, 0.5, 0.3, 0.1]  # the default need not be in the table
    assert eta_ladder(0.9, TABLE, min_eta=0.4) == [0.9, 0.7, 0.5]
    assert eta_ladder(0.9, [{"eta": 0.2030906}], min_eta=0.203091) == [0.9, 0.2030906]  # a rounded floor
    assert eta_ladder(0.9, TABLE, max_accuracy_drop=0.03) == [0.9, 0.7, 0.5]  # 0.80 - 0.77 <= 0.03
    assert eta_ladder(0.8, TABLE, max_accuracy_drop=0.02) == [0.8, 0.7]  # reference: the point above 0.8
    assert eta_ladder(0.5, None) == [0.5]  # no table: nowhere to go


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def feed(gov, clock, latency_ms, seconds, per_s=20):
    for _ in range(int(seconds * per_s)):
        clock.t += 1 / per_s
        gov.observe(latency_ms, ["coarse", "fine"])


def test_steps_down_under_load_to_the_floor_and_back_up_with_hysteresis():
    clock = Clock()
    gov = EtaGovernor(eta_ladder(0.9, TABLE, min_eta=0.3), target_ms=200, window_s=5, check_s=1,
                      recover_ratio=0.6, min_samples=10, clock=clock)
    feed(gov, clock, 100, 5)
    assert gov.current_eta == 0.9 and gov.steps == 0  # inside the target
    feed(gov, clock, 500, 1.0)  # one check in that second: one step
    assert gov.current_eta == 0.7 and "p99 500 ms > target 200 ms" in gov.reason
    feed(gov, clock, 500, 20)
    assert gov.current_eta == 0.3 and gov.floor_eta == 0.3  # at the floor, never below
    assert "at the floor" in gov.reason and gov.steps == 3
    feed(gov, clock, 150, 10)  # under the target but above 0.6 x target: hysteresis, nothing moves
    assert gov.current_eta == 0.3 and gov.steps == 3
    feed(gov, clock, 50, 6.5)  # once the 150 ms latencies have left the window, one step up per check
    assert gov.current_eta in (0.5, 0.7) and "load subsided" in gov.reason
    feed(gov, clock, 50, 20)
    assert gov.current_eta == 0.9 and gov.level == 0
    state = gov.state()
    assert state["exit_rate"] == pytest.approx(0.5) and state["latency_slo_ms"] == 200


def test_one_step_per_check_and_no_decision_on_too_few_samples():
    clock = Clock()
    gov = EtaGovernor([0.9, 0.7, 0.5], target_ms=100, window_s=10, check_s=2, min_samples=30, clock=clock)
    feed(gov, clock, 1000, 1.4)  # 28 samples: not enough to judge
    assert gov.level == 0
    feed(gov, clock, 1000, 0.8)
    assert gov.level == 1
    feed(gov, clock, 1000, 1.0)  # the window restarted at the step: 20 samples, under min_samples
    assert gov.level == 1
    with pytest.raises(ValueError):
        EtaGovernor([], target_ms=100)
