"""The sidecar's request rates (placement by popularity): per served name over a window, from the
runtime's per-version counts, a count that went down (a version registered again, a restarted
runtime) counting from 0, and what the sync report carries of them (the busiest, rounded)."""

from __future__ import annotations

from lorafleet.contracts.routes import SyncReport
from lorafleet.sidecar.sync import Syncer


def rates_over(windows: list[tuple[float, dict[str, tuple[str, int]]]], window: float = 10.0) -> list[dict]:
    s = Syncer.__new__(Syncer)  # only the rate state: no store, runtime or reporter needed
    s.rate_window, s._window, s.rates = window, None, {}
    out = []
    for mono, counts in windows:
        s._requests = counts
        out.append(dict(s._measure_rates(mono)))
    return out


def test_rates_per_served_name_over_the_window_with_resets():
    got = rates_over([
        (0.0, {"a@1": ("a", 100), "a@2": ("a", 0), "b@1": ("b", 5)}),
        (5.0, {"a@1": ("a", 150), "a@2": ("a", 10), "b@1": ("b", 5)}),  # mid-window: last rates kept
        (10.0, {"a@1": ("a", 200), "a@2": ("a", 20), "b@1": ("b", 6)}),
        # a@1 registered again (its count restarted), b gone, c new.
        (20.0, {"a@1": ("a", 30), "a@2": ("a", 40), "c@1": ("c", 50)}),
    ])
    assert got[0] == {} and got[1] == {}
    assert got[2] == {"a": 12.0, "b": 0.1}  # (100 + 20) / 10 s; 1 / 10 s
    assert got[3] == {"a": 5.0, "c": 5.0}  # (30 + 20) / 10 s; c from 0


def test_the_report_carries_the_busiest_rates_rounded():
    rates = {f"x{i:03d}": float(i) for i in range(300)} | {"slow": 0.001, "odd": 250.5}
    got = SyncReport.rates_of(rates)
    assert len(got) == SyncReport.MAX_RATES and "slow" not in got and "x000" not in got
    assert got["x299"] == 300.0 and got["odd"] == 250.0 and "x200" not in got and min(got.values()) == 200.0
    assert SyncReport.rates_of({"slow": 0.009, "a": 1.0, "b": 0.01}) == {"a": 1.0, "b": 0.01}
