"""Measurement: counts from the real model and file, MACs from a real forward."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from effray.compress.artifact import save_artifact
from effray.compress.measure import compare, count_macs, latency_ms, measure
from effray.compress.prune import prune_step
from effray.compress.quantize import QUANTIZERS, fold_bn
from effray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_macs_by_hand():
    torch.manual_seed(0)  # unseeded, one init weight in ~200 draws is an exact 0.0 and counts as pruned
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 10)
    )
    expected = 8 * 32 * 32 * 3 * 9 + 8 * 32 * 32 * 10
    assert count_macs(model, (3, 32, 32)) == {"macs": expected, "sparse_macs": expected}
    with torch.no_grad():
        model[0].weight[:4] = 0  # half the conv's weights
    got = count_macs(model, (3, 32, 32))
    assert got["macs"] == expected  # dense kernels still pay for zeros
    assert got["sparse_macs"] == expected - 8 * 32 * 32 * 3 * 9 // 2


def test_measure_reports_what_the_model_and_file_are(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10, width=0.25).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]
    save_artifact(tmp_path / "t", teacher)
    t = measure(teacher, batches, artifact=tmp_path / "t", latency_batches=(1, 4), repeats={1: 3, 4: 2}, threads=1)
    assert {
        "accuracy",
        "params",
        "nonzero_params",
        "macs",
        "sparse_macs",
        "bytes",
        "latency_ms_b1",
        "latency_ms_b4",
        "threads",
    } <= set(t)
    assert t["threads"] == 1 and t["eval_images"] == 8 and 0 <= t["accuracy"] <= 1
    assert t["params"] == sum(p.numel() for p in teacher.parameters())
    assert t["bytes"] == (tmp_path / "t" / "model.pt").stat().st_size
    # the same pass's logits: the temperature fitted on them and the NLL it gives, never above T = 1's
    assert 0 < t["temperature"] and t["nll_scaled"] <= t["nll"] + 1e-6 and 0 <= t["ece_scaled"] <= 1

    student = prune_step(build_model("resnet20", 10, width=0.25).eval(), 0.75, "unstructured")
    QUANTIZERS.get("ptq")(fold_bn(student), batches, bits=4)
    save_artifact(tmp_path / "s", student.eval())
    s = measure(student, batches, artifact=tmp_path / "s", teacher=t, latency_batches=(1,), repeats={1: 3})
    assert s["params"] < t["params"]  # BN folded away; step sizes are not counted as weights
    assert s["nonzero_params"] < 0.3 * s["params"]
    r = s["vs_teacher"]
    assert r["size_ratio"] > 6 and r["sparse_macs_ratio"] > 2
    assert r["macs_ratio"] == pytest.approx(1.0, rel=0.01)  # zeros don't cut dense MACs
    assert r["accuracy_drop_points"] == pytest.approx(100 * (t["accuracy"] - s["accuracy"]))


def test_compare_ratios():
    r = compare(
        {"bytes": 10, "macs": 50, "latency_ms_b1": 2.0, "int8_latency_ms_b1": 1.0, "accuracy": 0.9},
        {"bytes": 200, "macs": 100, "latency_ms_b1": 4.0, "accuracy": 0.92},
    )
    assert r == pytest.approx(
        {"size_ratio": 20.0, "macs_ratio": 2.0, "speedup_b1": 2.0, "int8_speedup_b1": 4.0, "accuracy_drop_points": 2.0}
    )


class _Calls(torch.nn.Module):
    """Counts its forwards; each takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_latency_stops_repeating_slow_calls_once_they_have_taken_the_budget():
    """A forward of 0.2 s with a 0.5 s budget: one warm-up call (it took over a tenth of the
    budget), then the three timed calls the median needs at least, not the ten asked for;
    two models interleaved get twice the budget. A fast forward runs every call asked for."""
    slow = _Calls(0.2)
    (ms,) = latency_ms(slow, batch_size=1, input_shape=(3, 4, 4), repeats=10, warmup=2, budget_s=0.5)
    assert slow.calls == 1 + 3 and 200 <= ms < 400
    a, b = _Calls(0.2), _Calls(0.2)
    latency_ms(a, b, batch_size=1, input_shape=(3, 4, 4), repeats=10, warmup=2, budget_s=0.5)
    assert a.calls == b.calls == 1 + 3
    fast = _Calls(0.0)
    latency_ms(fast, batch_size=1, input_shape=(3, 4, 4), repeats=10, warmup=2, budget_s=0.5)
    assert fast.calls == 2 + 10
