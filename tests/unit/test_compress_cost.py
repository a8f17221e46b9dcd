"""``predict_costs`` against the artifact a real fine-tune saves: params and MACs exact,
bytes within 2 %, non-zeros exact wherever the config alone fixes them, for every kind of
compression; and the prediction leaves the teacher (and the caller's RNG) as they were,
and gives the same answer twice."""

from __future__ import annotations

import pytest
import torch

from effray.compress.artifact import load_artifact
from effray.compress.config import CompressConfig
from effray.compress.cost import bytes_so_far, estimate_latency_ms, predict_costs
from effray.compress.measure import count_macs, nonzero_parameters, parameter_count
from effray.compress.recipe import compress_local
from effray.compress.steps import prune_events, quant_epoch
from effray.config import validated
from effray.errors import EffrayError
from effray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "int8": False,
    "calib_batches": 1,
    "finetune_batch_size": 32,
    "finetune_lr": 0.05,
    "finetune_epochs": 2,
}
CASES = {
    "unstructured-0.5-qat4": ("resnet20", {"prune_rate": 0.5, "bits": 4}),
    "structured-0.5-qat8": ("resnet20", {"prune_rate": 0.5, "prune_kind": "structured", "bits": 8}),
    "unstructured-0.7-float": ("resnet20", {"prune_rate": 0.7}),
    "quant-only-2bit-act8": ("convnet", {"bits": 2, "act_bits": 8}),
    "kd-student-qat4": ("resnet20", {"student": "resnet20", "student_width": 0.125, "kd_alpha": 0.5, "bits": 4}),
    "structured-cubic-3-steps": (
        "resnet20",
        {
            "prune_rate": 0.6,
            "prune_kind": "structured",
            "prune_schedule": "cubic",
            "prune_steps": 3,
            "bits": 8,
            "finetune_epochs": 6,
        },
    ),
    "structured-taylor-qat4": (
        "resnet20",
        {"prune_rate": 0.5, "prune_kind": "structured", "prune_importance": "taylor", "bits": 4},
    ),
    "structured-per-layer-qat4": (
        "resnet20",
        {"prune_kind": "structured", "layer_rates": "stem.0=0.5,s3b0.conv1=0.75", "prune_rate": 0.25, "bits": 4},
    ),
    "unstructured-taylor-0.8-float": ("resnet20", {"prune_rate": 0.8, "prune_importance": "taylor"}),
    "ptq": ("resnet20", {"prune_rate": 0.5, "bits": 4, "quant_mode": "ptq", "finetune_epochs": 0}),
    "codec-none": ("convnet", {"prune_rate": 0.5, "bits": 4, "codec": "none"}),
}


def teacher(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10, width=0.25).eval()


def batches(n: int, seed: int, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("case", list(CASES))
def test_prediction_matches_the_artifact_of_a_real_fine_tune(tmp_path, case):
    name, fields = CASES[case]
    cfg = validated(CompressConfig(**{**TINY, **fields}))
    model = teacher(name)
    predicted = predict_costs(model, cfg)
    train = batches(6, 0)  # 192 random images an epoch: the weights really move (lr 0.05)
    so_far = {}

    def on_epoch(epoch, student, progress):
        student(train[0][0])  # as a trial does: a forward first (its accuracy), which re-zeroes pruned weights
        so_far[epoch] = bytes_so_far(student, cfg, epoch, model.spec)

    result = compress_local(
        model,
        cfg,
        lambda epoch: train,
        train[:1],
        batches(1, 1),
        tmp_path,
        log=lambda line: None,
        teacher_metrics={},
        on_epoch=on_epoch,
    )
    real = result["student"]
    assert real["bytes"] == (tmp_path / "model.pt").stat().st_size
    # measured on the weights: unknown while the structure still changes, then the file's size
    final_form = lambda e: not any(p > e for p in prune_events(cfg)) and (quant_epoch(cfg) or 0) <= e  # noqa: E731
    assert all(
        (b is None) == (not final_form(e) or (cfg.quantizes and quant_epoch(cfg) is None)) for e, b in so_far.items()
    )
    if cfg.finetune_epochs and not (cfg.quantizes and quant_epoch(cfg) is None):
        assert so_far[cfg.finetune_epochs - 1] == real["bytes"]
    assert predicted["bytes"] == pytest.approx(real["bytes"], rel=0.02)  # measured: within 0.8 %
    assert (predicted["params"], predicted["macs"]) == (real["params"], real["macs"])
    loaded, _ = load_artifact(tmp_path)  # the same counters on the file: what the metrics say
    assert (parameter_count(loaded), count_macs(loaded)["macs"]) == (real["params"], real["macs"])
    # zeros that depend on trained values, not on the config, can't be known before training:
    # codes a fine-tuned weight rounds to 0 (QAT), and which layer a global unstructured
    # prune hits when it ranks by Taylor scores or by already fine-tuned weights
    qat = cfg.quantizes and cfg.finetune_epochs > 0
    spread = cfg.prune_kind == "unstructured" and (cfg.prune_importance == "taylor" or len(prune_events(cfg)) > 1)
    if qat:  # measured: nonzero_params within 1.5 %, sparse_macs within 2.2 %
        assert predicted["nonzero_params"] == pytest.approx(real["nonzero_params"], rel=0.02)
    else:
        assert predicted["nonzero_params"] == real["nonzero_params"] == nonzero_parameters(loaded)
    if qat or spread:
        assert predicted["sparse_macs"] == pytest.approx(real["sparse_macs"], rel=0.03)
    else:
        assert predicted["sparse_macs"] == real["sparse_macs"]


def test_prediction_leaves_the_teacher_alone_and_is_deterministic():
    cfg = validated(CompressConfig(prune_rate=0.5, prune_kind="structured", prune_importance="taylor", bits=4))
    model = teacher("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    first = predict_costs(model, cfg)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded on a fork of the caller's RNG
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.manual_seed(123)
    assert predict_costs(model, cfg) == first
    assert set(first) == {"bytes", "params", "nonzero_params", "macs", "sparse_macs"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_teacher_on_the_gpu_is_predicted_on_the_cpu():
    cfg = validated(CompressConfig(prune_rate=0.5, bits=4))
    model = teacher("resnet20")
    expected = predict_costs(model, cfg)
    assert predict_costs(model.cuda(), cfg) == expected
    assert all(p.is_cuda for p in model.parameters())


def test_latency_estimate_scales_with_macs():
    assert estimate_latency_ms(50, 200, 8.0) == pytest.approx(2.0)
    with pytest.raises(EffrayError, match="teacher MACs"):
        estimate_latency_ms(50, 0, 8.0)
