"""The simulated clock by hand: a round's length, the straggler cut-off at the deadline,
over-commitment, clients going offline mid-round; online windows (daily, across midnight, traces)
at given times; and the memory and deadline fit per size."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.devices.capacity import SizeNeed, expected_examples, expected_seconds, fit_capacity, size_needs
from fedhet.devices.clock import Clock, Demand
from fedhet.devices.profiles import MB, DeviceProfile
from fedhet.devices.schedule import DAY, HOUR, OnlineSchedule, daily_schedule, daily_window, read_trace
from fedhet.training.local import LocalTraining


def _profile(
    flops: float, down: float = 1 * MB, up: float = 1 * MB, latency: float = 0.0, memory: float = 1e9
) -> DeviceProfile:
    return DeviceProfile(flops=flops, memory=memory, down=down, up=up, latency=latency)


# clients 0..3: 2 MB down and 1 MB up at 1 MB/s = 3 s of communication; 1e10 FLOPs at 1e10, 2.5e9,
# 1e9 and 5e8 FLOP/s = 1, 4, 10 and 20 s of compute; client 3 has 0.5 s latency too
PROFILES = (_profile(1e10), _profile(2.5e9), _profile(1e9), _profile(5e8, latency=0.5))
DEMAND = Demand(bytes_down=2 * MB, flops=1e10, bytes_up=1 * MB)
TOTALS = {0: 4.0, 1: 7.0, 2: 13.0, 3: 23.5}


def test_round_lasts_as_long_as_its_slowest_client():
    plan = Clock(PROFILES, seed=0).plan(1, 0.0, {c: DEMAND for c in range(4)})
    assert {c: plan.costs[c].total for c in range(4)} == TOTALS
    assert (plan.costs[3].download, plan.costs[3].compute, plan.costs[3].upload, plan.costs[3].latency) == (
        2.0,
        20.0,
        1.0,
        0.5,
    )
    assert plan.on_time == [0, 1, 2, 3] and plan.stragglers == [] and plan.duration == 23.5


def test_deadline_makes_late_clients_stragglers_and_ends_the_round():
    plan = Clock(PROFILES, seed=0, deadline=10.0).plan(1, 0.0, {c: DEMAND for c in range(4)})
    assert plan.on_time == [0, 1] and plan.stragglers == [2, 3]
    assert plan.duration == 10.0  # the server waited until the deadline for clients 2 and 3
    # a client exactly at the deadline is on time; with everyone on time the round ends at the slowest
    plan = Clock(PROFILES, seed=0, deadline=13.0).plan(1, 0.0, {c: DEMAND for c in range(3)})
    assert plan.on_time == [0, 1, 2] and plan.stragglers == [] and plan.duration == 13.0


def test_overcommit_aggregates_the_first_to_finish():
    # 4 selected for a target of 2: the round ends when the second finishes
    plan = Clock(PROFILES, seed=0, target=2).plan(1, 0.0, {c: DEMAND for c in (3, 2, 1, 0)})
    assert plan.on_time == [0, 1] and plan.stragglers == [2, 3] and plan.duration == 7.0
    # fewer than the target by the deadline: wait until the deadline
    plan = Clock(PROFILES, seed=0, target=3, deadline=12.0).plan(1, 0.0, {c: DEMAND for c in range(4)})
    assert plan.on_time == [0, 1] and plan.stragglers == [2, 3] and plan.duration == 12.0


def test_a_client_going_offline_mid_round_drops_out():
    # client 1 online from 0 to 5 s only (a trace that runs once), the others always
    schedule = OnlineSchedule((((0.0, 1e9),), ((0.0, 5.0),), ((0.0, 1e9),), ((0.0, 1e9),)), period=None)
    plan = Clock(PROFILES, seed=0, schedule=schedule).plan(1, 0.0, {0: DEMAND, 1: DEMAND})
    assert plan.went_offline == [1] and plan.on_time == [0]
    assert plan.duration == 5.0  # the server learns at 5 s that client 1 is gone


def test_bandwidth_spread_changes_the_round_by_round_and_client():
    prof = DeviceProfile(flops=1e10, memory=1e9, down=1 * MB, up=1 * MB, down_sigma=0.5 * MB, up_sigma=0.5 * MB)
    clock = Clock((prof, prof), seed=3)
    a = clock.plan(1, 0.0, {0: DEMAND, 1: DEMAND})
    assert a.costs[0].total != a.costs[1].total
    assert clock.plan(1, 0.0, {0: DEMAND}).costs[0] == a.costs[0]  # keyed by (seed, round, client) only
    assert clock.plan(2, 0.0, {0: DEMAND}).costs[0] != a.costs[0]


# ------------------------------------------------------------------------------------- availability


def test_daily_window_at_given_times():
    # 8 hours from 20:00: online 20:00-24:00 and 00:00-04:00
    assert daily_window(20, 8) == ((0.0, 4 * HOUR), (20 * HOUR, DAY))
    s = OnlineSchedule((daily_window(20, 8), daily_window(9, 2), daily_window(0, 24)), period=DAY)
    assert s.online_until(0, 21 * HOUR) == DAY + 4 * HOUR  # across midnight, into the next day
    assert s.online_until(0, DAY + 3 * HOUR) == DAY + 4 * HOUR
    assert s.online_until(0, 12 * HOUR) is None
    assert s.next_online(0, 12 * HOUR) == 20 * HOUR
    assert s.next_online(0, 3 * DAY + 5 * HOUR) == 3 * DAY + 20 * HOUR
    assert s.online_until(1, 10.5 * HOUR) == 11 * HOUR and s.online_until(1, 11 * HOUR) is None
    assert s.next_online(1, 11 * HOUR) == DAY + 9 * HOUR
    assert s.online_until(2, 5 * DAY + 1) == math.inf


def test_daily_schedule_draws_start_hours_per_client():
    a = daily_schedule([6] * 50, [None] * 50, seed=1)
    b = daily_schedule([6] * 50, [None] * 50, seed=1)
    assert a == b
    online = sum(a.online_until(c, 12 * HOUR) is not None for c in range(50))
    assert 3 <= online <= 25  # about a quarter of the clients at any hour
    fixed = daily_schedule([6], [22.0], seed=1)
    assert fixed.windows[0] == ((0.0, 4 * HOUR), (22 * HOUR, DAY))


def test_trace_file(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("client,start,end\n0,0,100\n0,100,150\n1,50,60\n1,200,300\n")
    s = read_trace(path, 2)
    assert s.windows == (((0.0, 150.0),), ((50.0, 60.0), (200.0, 300.0)))  # touching intervals merge
    assert s.online_until(0, 120) == 150.0 and s.online_until(0, 150) is None and s.next_online(0, 150) is None
    assert s.online_until(1, 10) is None and s.next_online(1, 10) == 50.0 and s.next_online(1, 70) == 200.0
    repeating = read_trace(path, 2, period=400)
    assert repeating.next_online(0, 390) == 400.0 and repeating.online_until(1, 455) == 460.0


@pytest.mark.parametrize(
    "text, needle",
    [
        ("client,begin,end\n0,0,1\n", "has columns client, begin, end; allowed: exactly client, start, end"),
        ("client,start,end\n0,5,1\n1,0,1\n", "row 1: start 5 is not before end 1"),
        ("client,start,end\n0,0,1\n", "has no rows for clients 1"),
        ("client,start,end\n0,0,1\n7,0,1\n", "row 2: client got '7', allowed: an integer 0..1"),
        ("client,start,end\n0,x,1\n1,0,1\n", "row 1: start got 'x', allowed: a number"),
    ],
)
def test_bad_trace_files(tmp_path, text, needle):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match="devices.availability.trace") as err:
        read_trace(path, 2)
    assert needle in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- capacity


def test_fit_per_size_by_memory_and_deadline():
    # three sizes, largest first: 300, 100 and 40 MB to train; 1e6, 4e5 and 1e5 FLOPs per example;
    # 10, 4 and 1 MB of parameters
    needs = [SizeNeed(300 * MB, 1e6, 10 * MB), SizeNeed(100 * MB, 4e5, 4 * MB), SizeNeed(40 * MB, 1e5, 1 * MB)]
    local = LocalTraining(epochs=2)
    devices = [
        _profile(1e9, memory=512 * MB),  # holds the largest
        _profile(1e9, memory=200 * MB),  # the middle one
        _profile(1e9, memory=50 * MB),  # the smallest
        _profile(1e9, memory=10 * MB),  # none
        _profile(1e7, memory=512 * MB),  # memory for the largest, but slow
    ]
    fits, memory = fit_capacity(devices, needs, [100] * 5, local, None)
    assert fits == memory == [0, 1, 2, None, 0]
    # 200 examples a round; at 1e7 FLOP/s the largest takes 20 s of compute + 20 s of communication,
    # the middle 8 + 8 s, the smallest 2 + 2 s
    assert expected_examples(100, local) == 200
    assert expected_seconds(devices[4], needs[0], 200) == pytest.approx(40.0)
    # a 25 s deadline: the slow device trains the middle size (16 s); the others are unchanged
    # (device 0 at the largest: 0.2 s of compute + 20 s of communication)
    fits, memory = fit_capacity(devices, needs, [100] * 5, local, 25.0)
    assert fits == [0, 1, 2, None, 1] and memory == [0, 1, 2, None, 0]
    # at 5 s only the smallest fits anyone (1 s of communication each way + 0.02 s), and the slow one's 4 s
    fits, _ = fit_capacity(devices, needs, [100] * 5, local, 5.0)
    assert fits == [2, 2, 2, None, 2]
    assert expected_examples(100, LocalTraining(epochs=2, max_steps=3, batch_size=16)) == 48


def test_size_needs_by_hand():
    class Net(nn.Module):
        def __init__(self, width: float) -> None:
            super().__init__()
            self.fc = nn.Linear(4, int(8 * width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    def build(config: dict) -> nn.Module:
        return Net(config["width"])

    local = LocalTraining(batch_size=5, momentum=0.9)
    full, half = size_needs(build, [ModelSize(width=1.0), ModelSize(width=0.5)], (4,), torch.float32, local)
    # width 1: 40 parameters (160 bytes) x (weights, gradients, momentum) + a 5 x 8 output (160 bytes)
    assert full.memory == 160 * 3 + 160 and full.bytes == 160
    assert full.flops_per_example == 3 * 2 * 4 * 8
    # width 0.5: 20 parameters (80 bytes) x 3 + a 5 x 4 output (80 bytes)
    assert half.memory == 80 * 3 + 80 and half.bytes == 80
    # density 0.5: half the parameters, gradients, momentum and FLOPs; the same activations
    (sparse,) = size_needs(build, [ModelSize(width=1.0, density=0.5)], (4,), torch.float32, local)
    assert sparse.memory == 80 * 3 + 160 and sparse.bytes == 80 and sparse.flops_per_example == 3 * 2 * 4 * 8 / 2
