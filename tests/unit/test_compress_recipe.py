"""The in-process recipe end to end on tiny random data: the plan, the artifact, the metrics."""

from __future__ import annotations

import pytest
import torch

from effray.compress.artifact import load_artifact
from effray.compress.config import CompressConfig
from effray.compress.recipe import compress_local
from effray.compress.steps import build_student, prune_events, quant_epoch
from effray.config import validated
from effray.errors import EffrayError
from effray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_epoch_plan():
    cfg = CompressConfig(prune_rate=0.8, prune_schedule="cubic", prune_steps=3, bits=4, finetune_epochs=6)
    events = prune_events(cfg)
    assert sorted(events) == [0, 1, 2] and events[2] == pytest.approx(0.8)
    assert quant_epoch(cfg) == 3  # QAT after the pruning span
    assert quant_epoch(CompressConfig(bits=4, finetune_epochs=1, prune_rate=0.5)) == 0
    assert quant_epoch(CompressConfig(bits=4, quant_mode="ptq", finetune_epochs=3)) is None
    assert prune_events(CompressConfig(prune_rate=0.5, finetune_epochs=0)) == {0: 0.5}


def test_student_with_other_classes_is_one_line():
    teacher = build_model("resnet20", 10, width=0.25)
    student = build_student(teacher, validated(CompressConfig(student="convnet", student_width=0.5)))
    assert student.spec["num_classes"] == 10
    from effray.compress.distill import check_student

    with pytest.raises(EffrayError, match="must match to distil"):
        check_student(teacher.spec, build_model("convnet", 100).spec)


@pytest.mark.parametrize(
    "cfg",
    [
        CompressConfig(
            prune_rate=0.5,
            prune_schedule="cubic",
            prune_steps=2,
            bits=4,
            kd_alpha=0.5,
            finetune_epochs=2,
            finetune_lr=0.01,
            calib_batches=1,
        ),
        CompressConfig(
            prune_rate=0.3,
            prune_kind="structured",
            bits=8,
            quant_mode="ptq",
            finetune_epochs=0,
            calib_batches=1,
            codec="none",
        ),
    ],
)
def test_compress_local(tmp_path, cfg):
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10, width=0.25).eval()
    train, evals = batches(2, 0), batches(1, 1)
    result = compress_local(
        teacher,
        validated(cfg),
        lambda epoch: train,
        train[:1],
        evals,
        tmp_path,
        teacher_info={"checksum": "sha256:x"},
        log=lambda line: None,
    )
    s, t = result["student"], result["teacher"]
    model, payload = load_artifact(tmp_path)
    assert payload["teacher"] == {"checksum": "sha256:x"} and payload["config"]["bits"] == cfg.bits
    assert s["bytes"] == (tmp_path / "model.pt").stat().st_size < t["bytes"] / 3
    assert s["vs_teacher"]["size_ratio"] > 3
    assert {"int8_latency_ms_b256", "int8_accuracy", "latency_ms_b1"} <= set(s)
    method = result["method"]
    assert method["quant"]["bits_per_layer"]["s2b1.conv2"] == cfg.bits
    if cfg.prune_kind == "unstructured":
        assert method["prune"]["weight_sparsity"] >= 0.5 - 1e-3
    else:
        assert s["vs_teacher"]["macs_ratio"] > 1.3


def test_a_vit_teacher_distils_into_a_pruned_quantized_cnn(tmp_path):
    """ViT -> CNN: any teacher, any student of the same classes and inputs (the KD loss reads
    only logits), the student pruned through its channels and quantized on the way."""
    torch.manual_seed(0)
    teacher = build_model("timm:vit_tiny_patch16_224", 10, kwargs={"img_size": 32, "patch_size": 8, "depth": 2})
    cfg = CompressConfig(
        student="convnet", kd_alpha=0.7, prune_kind="structured", prune_rate=0.3, bits=4, finetune_batch_size=16
    )
    train, evals = batches(2, 0), batches(1, 1)
    result = compress_local(
        teacher.eval(), validated(cfg), lambda epoch: train, train[:1], evals, tmp_path, teacher_info={}, log=print
    )
    model, payload = load_artifact(tmp_path)
    assert payload["model_spec"]["name"] == "convnet" and result["method"]["teacher_model"]["library"] == "timm"
    assert result["method"]["kd"] == {"temperature": 4.0, "alpha": 0.7}
    assert result["method"]["quant"]["bits"] == 4 and result["method"]["prune"]["kind"] == "structured"
    assert result["student"]["bytes"] < result["teacher"]["bytes"] / 10  # a 4-bit convnet against an fp32 ViT
    assert model(evals[0][0]).shape == (16, 10)


@pytest.mark.parametrize(
    "cfg,resume_after",
    [
        (
            CompressConfig(
                prune_rate=0.6,
                prune_schedule="cubic",
                prune_steps=2,
                bits=4,
                kd_alpha=0.5,
                finetune_epochs=4,
                finetune_lr=0.02,
                calib_batches=1,
                int8=False,
            ),
            3,
        ),  # unstructured zeros and QAT already in
        (
            CompressConfig(
                prune_rate=0.4,
                prune_kind="structured",
                bits=8,
                finetune_epochs=3,
                finetune_lr=0.02,
                calib_batches=1,
                int8=False,
            ),
            1,
        ),  # pruned shapes in, QAT still to come
        (
            CompressConfig(
                prune_rate=0.4,
                prune_kind="structured",
                kd_features="s2b2,s3b2",
                finetune_epochs=3,
                finetune_lr=0.02,
                calib_batches=1,
                int8=False,
            ),
            2,
        ),  # feature KD: projections rebuilt for the narrowed student, then resumed with their momentum
    ],
)
def test_a_resumed_fine_tune_ends_where_the_uninterrupted_one_does(tmp_path, cfg, resume_after):
    """The progress checkpoint after an epoch (written and read back weights-only) resumes
    the recipe to bit-identical weights: structure, latent weights, momentum, LR step, RNG."""
    from effray.compress.progress import resume_student
    from effray.train.checkpoint import load_checkpoint, read_payload, save_payload

    cfg = validated(cfg)
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10, width=0.25).eval()
    evals = batches(1, 99)

    def run(out, resume=None):
        kept = {}

        def on_epoch(epoch, model, progress):
            kept[epoch + 1] = save_payload(tmp_path / f"{out.name}-progress-{epoch + 1}", progress())

        compress_local(
            teacher,
            cfg,
            lambda epoch: batches(2, epoch),
            batches(1, 50),
            evals,
            out,
            log=lambda line: None,
            steps_per_epoch=2,
            on_epoch=on_epoch,
            resume=resume,
        )
        return load_artifact(out)[0], kept

    whole, kept = run(tmp_path / "whole")
    assert sorted(kept) == list(range(1, cfg.finetune_epochs + 1))
    progress = read_payload(kept[resume_after])
    torch.manual_seed(123)  # whatever the process did since: the checkpoint's RNG wins
    resumed, later = run(tmp_path / "resumed", resume=progress)
    assert sorted(later) == list(range(resume_after + 1, cfg.finetune_epochs + 1))  # no epoch twice
    last = cfg.finetune_epochs
    latent = [read_payload(k)["student"]["state"] for k in (kept[last], later[last])]  # below the quantizer's codes
    for a, b in ((whole.state_dict(), resumed.state_dict()), latent):
        for (name, x), (_, y) in zip(a.items(), b.items(), strict=True):
            assert torch.equal(x, y), name
    student, _ = load_checkpoint(kept[resume_after])  # `effray evaluate` opens a progress checkpoint
    assert not student.training and student(evals[0][0]).shape == (16, 10)
    with pytest.raises(EffrayError, match="another compression config"):
        resume_student(progress, validated(CompressConfig(prune_rate=0.1, finetune_epochs=4)))


@pytest.mark.parametrize(
    "qat_bn, losses",
    [("fold", [1.1591176, 1.1440657, 1.1505673]), ("simulate", [1.1591174, 1.147111, 1.1522492])],
)
def test_a_seeded_fine_tune_pins_its_losses(tmp_path, qat_bn, losses):
    """The recipe's loop, pinned: a seeded prune + QAT + KD fine-tune on fixed batches
    reports these per-epoch losses (rows-weighted means, read once per epoch), LR and
    step counts; a change to the loop's order of operations or RNG draws moves them.
    Epoch 0 prunes (QAT starts at epoch 1), so only the QAT epochs differ between folding
    the BNs first and simulating their fold; ``fold`` keeps the loop's losses from before
    the simulation existed."""
    cfg = validated(
        CompressConfig(
            qat_bn=qat_bn,
            prune_rate=0.5,
            prune_schedule="cubic",
            prune_steps=2,
            bits=4,
            kd_alpha=0.5,
            finetune_epochs=3,
            finetune_lr=0.02,
            calib_batches=1,
            int8=False,
        )
    )
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10, width=0.25).eval()
    seen = {}
    compress_local(
        teacher,
        cfg,
        lambda epoch: batches(2, epoch),
        batches(1, 50),
        batches(1, 99),
        tmp_path,
        log=lambda line: None,
        teacher_metrics={},
        steps_per_epoch=2,
        on_epoch=lambda epoch, model, progress: seen.update({epoch: progress()["history"][-1]}),
    )
    assert [seen[e]["train_loss"] for e in range(3)] == pytest.approx(losses, rel=1e-4)
    assert [seen[e]["optimizer_steps"] for e in range(3)] == [2, 4, 6]
    assert [seen[e]["train_rows"] for e in range(3)] == [32, 32, 32]
    assert [seen[e]["lr"] for e in range(3)] == pytest.approx([0.015, 0.005, 0.0], abs=1e-12)  # the next step's
