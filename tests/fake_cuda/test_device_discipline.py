"""Every hot path that runs on a GPU, run here under fake CUDA (see conftest.py): a test
passes only if the code keeps every tensor on the model's device and never reads a value
back to the host inside a step.

Regression check for the first GPU bug (validation compared ``.cpu()`` logits with labels
that Ray had moved to the GPU): ``test_validation_batch[bug1-logits-on-cpu]`` puts that
behaviour back and asserts the error. To see the real test catch it, add ``.cpu()`` after
``tta_logits(...)`` in ``effray.train.validate.batch_sums`` and run
``.venv/bin/python -m pytest -q tests/fake_cuda -k validation``: every
``test_validation_batch[*-fixed]`` case fails (``HostCopyError``: the copy to the host;
without that guard, ``FakeTensorDeviceMismatchError`` where CPU logits meet CUDA labels).
"""

from __future__ import annotations

import pytest
import torch
from fakecuda import CUDA, HostCopyError, assert_cuda, uint8_batch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

from effray.data.images import channel_stats, normalize_tensor
from effray.models import build_model
from effray.train.strategy import DDPStrategy

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _strategy(channels_last: bool = True) -> DDPStrategy:
    return DDPStrategy(CUDA, channels_last=channels_last, compile=False, amp=True)


def _on_gpu(model: torch.nn.Module, strategy: DDPStrategy) -> torch.nn.Module:
    """What ``DDPStrategy.prepare`` does to the module (less the DDP wrapper, whose reducer
    is C++ over real storage): the model's device and memory format."""
    fmt = torch.channels_last if strategy.channels_last else torch.contiguous_format
    return model.to(CUDA, memory_format=fmt)


def _images(batch: dict[str, torch.Tensor], channels_last: bool = True) -> dict[str, torch.Tensor]:
    """The pipeline's last step, as :func:`effray.data.pipeline.torch_batches` does it: uint8
    arrives on the device and is normalised there."""
    return {**batch, "image": normalize_tensor(batch["image"], *channel_stats(MEAN, STD, CUDA), channels_last)}


# ------------------------------------------------------------------ training and validation


@pytest.mark.parametrize("name", ["convnet", "resnet20", "fastnet", "airbench"])
@pytest.mark.parametrize("lookahead", [False, True])
def test_ddp_training_step(fake_cuda, name, lookahead):
    """The loop's own step (zero_grad, forward/backward through the strategy, SGD, LR
    schedule, device-side loss sums, lookahead), two steps so momentum buffers exist."""
    from effray.models.airbench import whitening_biases
    from effray.train.step import Lookahead, Schedule, param_groups, soft_cross_entropy, train_step

    torch.manual_seed(0)
    model = build_model(name, 10, 3, 0.25 if name != "convnet" else 0.5)
    strategy = _strategy()
    with fake_cuda:
        model = _on_gpu(model, strategy).train()
        opt = torch.optim.SGD(param_groups(model, 5e-4, 0.1, bias_lr_scale=64.0), lr=0.1, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule("onecycle", 10, 2))
        ahead = Lookahead(4, every=1, start=0.0) if lookahead else None
        sums = torch.zeros(2, dtype=torch.float64, device=strategy.reduce_device)
        for step in range(2):
            batch = _images(uint8_batch(), strategy.channels_last)
            frozen = whitening_biases(model) if step else ()  # airbench's stem bias, frozen on the 2nd step
            train_step(
                strategy, model, opt, sched, batch, lambda y, b: soft_cross_entropy(y, b, 0.1), sums, frozen=frozen
            )
            if ahead is not None:
                ahead.after_step(model, step + 1)
        assert_cuda(
            sums, *model.parameters(), *(s for st in opt.state.values() for s in st.values() if torch.is_tensor(s))
        )


def test_the_step_bar_reads_the_loss_without_waiting_for_the_gpu(fake_cuda):
    """Rank 0's per-step bar between training steps: images/s from host counts, the loss
    through a non-blocking copy it reads only once the copy's event completes (never, here:
    the fake copy holds no value, so reading it early would raise)."""
    from effray.train.step import Schedule, soft_cross_entropy, train_step
    from effray.train.stepbar import EpochBar

    model = build_model("convnet", 10, 3, 0.5)
    strategy = _strategy()
    states = []
    with fake_cuda:
        model = _on_gpu(model, strategy).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule("onecycle", 10, 2))
        sums = torch.zeros(2, dtype=torch.float64, device=strategy.reduce_device)
        bar = EpochBar(states.append, "epoch 1/1", 3, sums, replicas=2, delay_s=0.0, every_s=0.0)
        for _ in range(3):
            batch = _images(uint8_batch(), strategy.channels_last)
            train_step(strategy, model, opt, sched, batch, lambda y, b: soft_cross_entropy(y, b, 0.1), sums)
            bar.step(len(batch["label"]))
        bar.end()
        assert_cuda(sums)
    assert [s.step for s in states] == [1, 2, 3, 3] and states[-1].done
    assert all(s.loss is None and s.images_per_s > 0 for s in states)


@pytest.mark.parametrize("variant", ["fixed", "bug1-logits-on-cpu"])
@pytest.mark.parametrize("tta", [0, 1, 2])
def test_validation_batch(fake_cuda, variant, tta):
    """One validation batch with test-time augmentation into device-side sums."""
    from effray.metrics import sums_size
    from effray.train.validate import batch_sums

    model = build_model("resnet20", 10, 3, 0.25).eval()
    strategy = _strategy()
    if variant != "fixed":  # the shipped bug: logits brought to the host, labels on the GPU
        predict = strategy.predict
        strategy.predict = lambda m, x: predict(m, x).cpu()  # type: ignore[method-assign]
    with fake_cuda:
        model = _on_gpu(model, strategy)
        batch = _images(uint8_batch(16))
        if variant != "fixed":
            with pytest.raises((FakeTensorDeviceMismatchError, HostCopyError)):
                batch_sums(strategy, model, batch["image"], batch["label"], 10, tta)
            return
        sums = batch_sums(strategy, model, batch["image"], batch["label"], 10, tta)
        assert_cuda(sums)
        assert sums.shape == (sums_size(10),) and sums.dtype == torch.float64


def test_class_sums_match_a_host_count():
    """The device-side tallies (scatter adds, no boolean indexing) equal a plain count, the
    calibration bins' too."""
    from effray.metrics import ECE_BINS, GRID_TEMPERATURES, class_sums

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    s = class_sums(logits, labels, 3)
    assert s[0] == 2  # rows 0 and 2
    torch.testing.assert_close(s[1], torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double())
    assert s[2:5].tolist() == [1.0, 0.0, 1.0] and s[5:8].tolist() == [1.0, 1.0, 2.0]
    cal = s[8:].view(len(GRID_TEMPERATURES), 1 + 3 * ECE_BINS)
    at_one = cal[len(GRID_TEMPERATURES) // 2]  # T = 1
    torch.testing.assert_close(at_one[0], s[1])  # its NLL is the loss
    count, hits = at_one[1 : 1 + ECE_BINS], at_one[1 + 2 * ECE_BINS :]
    assert count.sum() == 4 and hits.sum() == 2
    confidence = logits.softmax(1).amax(1)  # each row in its bin, as torchmetrics bins it
    assert [int(count[b]) for b in (confidence * ECE_BINS).long().tolist()] == [1, 1, 1, 1]


# ------------------------------------------------------------------ GPU augmentation


def _policies() -> list[str]:
    """Every registered op, and the chains that run fused pairs or several ops."""
    from effray.data.augment_spec import OPS

    return [*OPS.names(), "crop(4)|flip", "crop(2)|altflip", "flip|rotate(10)", "strong"]


@pytest.mark.parametrize("op", _policies())
def test_gpu_augmentation_op(fake_cuda, op):
    """Every registered op on a uint8 CUDA batch with a CUDA generator: outputs on the
    device, no host read (RandAugment's and mixup's draws included)."""
    from effray.data.augment import batch_generator, parse_policy

    policy = parse_policy(op, 10)
    with fake_cuda:
        out = policy(uint8_batch(), batch_generator(0, 1, 2, CUDA))
        assert_cuda(*(v for v in out.values() if torch.is_tensor(v)))
        assert out["image"].dtype == torch.uint8 and out["image"].shape == (8, *policy.output_size(32, 32), 3)


@pytest.mark.parametrize("text", ["resize(24)", "center_crop(24)|resize(40)", "random_resized_crop(24)|flip"])
def test_size_changing_ops_and_a_models_preprocessing_on_the_device(fake_cuda, text):
    """The ops that change the image size, and a model's preprocessing before its
    normalisation (validation rows stored larger than the model's input), on the device."""
    from effray.data.augment import batch_generator, model_input, parse_policy, preprocess

    with fake_cuda:
        out = parse_policy(text, 10)(uint8_batch(), batch_generator(0, 1, 2, CUDA))["image"]
        assert_cuda(out)
        stats = channel_stats(MEAN, STD, CUDA)
        x = model_input(uint8_batch(hw=40)["image"], "resize(24)|center_crop(24)", *stats, channels_last=True)
        assert_cuda(x)
        assert x.shape == (8, 3, 24, 24) and x.is_contiguous(memory_format=torch.channels_last)
        assert preprocess(out, "none") is out


def test_augment_on_device_feeds_the_step(fake_cuda):
    """``--augment-on gpu``: augmentation, normalisation (channels-last) and the training
    step on one device."""
    from effray.data.augment import augment_on_device, parse_policy
    from effray.train.step import Schedule, soft_cross_entropy, train_step

    model = build_model("resnet20", 10, 3, 0.25)
    strategy = _strategy()
    policy = parse_policy("crop(4)|flip|cutout(8)|mixup(0.4)", 10)
    with fake_cuda:
        model = _on_gpu(model, strategy).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule("cosine", 4, 0))
        stats = channel_stats(MEAN, STD, CUDA)
        batch = augment_on_device(uint8_batch(), policy, stats, CUDA, (0, 0, 1, 0), channels_last=True)
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        sums = torch.zeros(2, dtype=torch.float64, device=CUDA)
        train_step(strategy, model, opt, sched, batch, lambda y, b: soft_cross_entropy(y, b, 0.0), sums)
        assert_cuda(batch["image"], batch["target"], sums)


# ------------------------------------------------------------------ compression


def _calib(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b["image"], b["label"]) for b in (_images(uint8_batch(8), False) for _ in range(n))]


def _fine_tune_step(model, teacher, x, y, optimizer, cfg) -> torch.Tensor:
    """One compression fine-tuning step as the recipe's hooks take it: the training loop's
    step with the recipe's loss (KD against ``teacher`` or CE) and cosine LR; returns the
    step's device-side sums (loss x rows, rows)."""
    from effray.compress.steps import CosineSteps, fine_tune_loss
    from effray.train.step import train_step

    strategy = DDPStrategy(x.device, channels_last=False, compile=False, amp=False)
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    schedule = CosineSteps(optimizer, 0, 10, cfg.finetune_lr)
    train_step(strategy, model, optimizer, schedule, {"image": x, "label": y}, fine_tune_loss(cfg, teacher), sums)
    return sums


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_unstructured_pruning_and_lock(fake_cuda, importance):
    """Global magnitude/Taylor pruning of a CUDA model (mask, scores, argsort on the device),
    then a locked fine-tuning step."""
    from effray.compress.prune import lock_sparsity, prune_step

    model = build_model("resnet20", 10, 3, 0.25)
    with fake_cuda:
        model = model.to(CUDA).train()
        prune_step(model, 0.5, "unstructured", importance, batches=_calib())
        with lock_sparsity(model) as lock:
            assert_cuda(*lock.masks.values())
            x, y = _calib(1)[0]
            torch.nn.functional.cross_entropy(model(x), y).backward()
        assert_cuda(*model.parameters())


@pytest.mark.parametrize(
    "variant", ["fixed", "bug2-cpu-example-inputs", "tests.user_models:residual_dw", "timm:vit_tiny_patch16_224"]
)
def test_structured_pruning_traces_and_scores_on_the_device(fake_cuda, variant):
    """Torch-Pruning's dependency graph is traced through the CUDA model with inputs on its
    device, and every channel group is scored there (a referenced model's too: a user's
    residual + depthwise module, a ViT whose attention loses whole heads, whose unsafe
    groups are found on the device). Choosing which channels go (the new shapes) is the
    one host read of a pruning event, between epochs; the real-CUDA test (tests/cuda) runs
    it whole."""
    from effray.compress.layers import classifier
    from effray.compress.prune import IMPORTANCES, structured_pruner
    from effray.compress.structure import unsafe_layers

    if ":" in variant:
        kwargs = "?img_size=32,depth=2,embed_dim=48,num_heads=3" if variant.startswith("timm") else "?width=8"
        model = build_model(variant + kwargs, 10).eval()
        with fake_cuda:
            model = model.to(CUDA)
            example = torch.randn(1, 3, 32, 32, device=CUDA)
            skipped = unsafe_layers(model, example)
            assert bool(skipped) == variant.startswith("timm")  # the ViT's residual stream meets its pos_embed
            pruner = structured_pruner(model, 0.3, IMPORTANCES.get("l1"), example, ignored=list(skipped))
            groups = list(
                pruner.DG.get_all_groups(
                    ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
                )
            )
            assert len(groups) >= 2
            for group in groups:
                scores = pruner.estimate_importance(group)
                if scores is not None:
                    assert_cuda(scores)
        return
    model = build_model("resnet20", 10, 3, 0.25).eval()
    with fake_cuda:
        model = model.to(CUDA)
        if variant != "fixed":  # the shipped bug: a CPU example batch traced through a CUDA model
            import torch_pruning as tp

            with pytest.raises(RuntimeError, match="device"):  # the conv's own check: weight cuda, input cpu
                tp.pruner.MetaPruner(
                    model,
                    torch.randn(1, 3, 32, 32),
                    importance=IMPORTANCES.get("l1").group(),
                    pruning_ratio=0.3,
                    ignored_layers=[classifier(model)],
                )
            return
        pruner = structured_pruner(model, 0.3, IMPORTANCES.get("l1"))
        groups = list(
            pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
        )
        assert len(groups) > 3
        for group in groups:
            scores = pruner.estimate_importance(group)
            if scores is not None:
                assert_cuda(scores)


@pytest.mark.parametrize("act_range", ["ema", "lsq"])
@pytest.mark.parametrize("kd_alpha", [0.0, 0.9])
def test_qat_steps_with_distillation(fake_cuda, act_range, kd_alpha):
    """BN statistics re-estimated, k-bit QAT modules created beside the CUDA weights with
    their BNs' folds simulated, calibration, then QAT fine-tuning steps (KD against a CUDA
    teacher when ``kd_alpha``): forward and backward with no host read (activation ranges
    and zero points stay device tensors); then the real fold, on the device."""
    from effray.compress.config import CompressConfig
    from effray.compress.distill import freeze_teacher
    from effray.compress.fakequant import ActQuant, WeightQuant
    from effray.compress.quantize import has_linked_bn
    from effray.compress.steps import apply_quantization, build_student, finish, make_optimizer

    cfg = CompressConfig(bits=4, act_bits=8, act_range=act_range, kd_alpha=kd_alpha, calib_batches=2)
    teacher = build_model("resnet20", 10, 3, 0.25)
    teacher.spec = dict(teacher.spec)
    student = build_student(teacher, cfg)
    with fake_cuda:
        teacher, student = freeze_teacher(teacher).to(CUDA), student.to(CUDA)
        apply_quantization(student, cfg, _calib())
        quantizers = [m for m in student.modules() if isinstance(m, (WeightQuant, ActQuant))]
        assert quantizers and all(q.is_ready for q in quantizers)
        assert_cuda(*(t for q in quantizers for t in (*q.parameters(), *q.buffers())))
        assert has_linked_bn(student)
        opt = make_optimizer(student, 0.01)
        for x, y in _calib(2):
            assert_cuda(_fine_tune_step(student.train(), teacher, x, y, opt, cfg))
        finish(student, cfg, _calib())
        assert not has_linked_bn(student)
        assert_cuda(*student.parameters(), *student.buffers())


def test_a_per_layer_allocation_prunes_quantizes_and_steps_on_the_device(fake_cuda):
    """An allocation's config as a trial trains it: each layer pruned to its own rate (its
    k-lowest mask on the device), its own weight bits, then locked QAT steps with no host read."""
    from effray.compress.config import CompressConfig, format_layers
    from effray.compress.fakequant import WeightQuant
    from effray.compress.prune import lock_sparsity, prunable_layers
    from effray.compress.steps import apply_quantization, build_student, make_optimizer, prune_at, prune_events

    teacher = build_model("resnet20", 10, 3, 0.25)
    teacher.spec = dict(teacher.spec)
    names = [n for n, _ in prunable_layers(teacher)]
    cfg = CompressConfig(
        bits=4,
        prune_rate=0.5,
        calib_batches=1,
        layer_bits=format_layers({n: (2, 3, 6)[i % 3] for i, n in enumerate(names)}),
        layer_rates=format_layers({n: (0.25, 0.5, 0.75)[i % 3] for i, n in enumerate(names[:-1])}),
    )
    student = build_student(teacher, cfg)
    with fake_cuda:
        student = student.to(CUDA).train()
        for rate in prune_events(cfg).values():
            prune_at(student, cfg, rate)
        apply_quantization(student, cfg, _calib(1))
        assert sorted({m.bits for m in student.modules() if isinstance(m, WeightQuant)}) == [2, 3, 6]
        opt = make_optimizer(student, 0.01)
        with lock_sparsity(student) as lock:
            assert_cuda(*lock.masks.values())
            for x, y in _calib(2):
                assert_cuda(_fine_tune_step(student, None, x, y, opt, cfg))
        assert_cuda(*student.parameters())


def test_feature_distillation_projects_and_steps_on_the_device(fake_cuda):
    """--kd-features on a narrower student: the probe that sizes the projections, the
    projections themselves, the taps' outputs and the step's loss all stay on the device."""
    from effray.compress.config import CompressConfig
    from effray.compress.distill import freeze_teacher
    from effray.compress.features import FeatureKD
    from effray.compress.steps import CosineSteps, fine_tune_loss, make_optimizer
    from effray.train.step import train_step

    cfg = CompressConfig(kd_alpha=0.5, kd_features="s2b2,s3b2")
    teacher = freeze_teacher(build_model("resnet20", 10, 3, 0.5))
    student = build_model("resnet20", 10, 3, 0.25)
    with fake_cuda:
        teacher, student = teacher.to(CUDA), student.to(CUDA).train()
        (x, y), *_ = _calib(1)
        kd = FeatureKD(cfg.feature_pairs, teacher)
        assert kd.attach(student, x[:1])
        assert_cuda(*kd.trainable())
        opt = make_optimizer(student, 0.01, kd.trainable())
        strategy = DDPStrategy(CUDA, channels_last=False, compile=False, amp=False)
        sums = torch.zeros(2, dtype=torch.float64, device=CUDA)
        loss = fine_tune_loss(cfg, teacher, lambda: kd.loss(kd.projector))
        train_step(strategy, student, opt, CosineSteps(opt, 0, 10, 0.01), {"image": x, "label": y}, loss, sums)
        assert_cuda(sums, *student.parameters(), *kd.trainable())


def test_a_resumed_qat_fine_tune_steps_on_the_device(fake_cuda):
    """A progress checkpoint (written on the CPU, as a dead node's trial left it) resumes on
    the GPU: the restored student, its quantizers and the optimizer's momentum all land on
    the model's device, and the next QAT steps run there with no host read."""
    from effray.compress.config import CompressConfig
    from effray.compress.progress import progress_payload, resume_student
    from effray.compress.steps import apply_quantization, build_student, make_optimizer

    cfg = CompressConfig(bits=4, act_bits=8, calib_batches=1, finetune_epochs=2)
    teacher = build_model("resnet20", 10, 3, 0.25)
    teacher.spec = dict(teacher.spec)
    student = apply_quantization(
        build_student(teacher, cfg), cfg, [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))]
    )
    opt = make_optimizer(student, 0.01)
    # a step, so the momentum exists
    _fine_tune_step(student, None, torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), opt, cfg)
    payload = progress_payload(student, opt, cfg, epochs_done=1, step=1, lock=None)
    # the checkpoint loads into real CPU tensors (its load hooks read the quantizers' ready
    # flags, once); resume_student then moves the student to the device, as here
    model, done, step, state = resume_student(payload, cfg, "cpu")
    with fake_cuda:
        model = model.to(CUDA)
        opt = make_optimizer(model, 0.01)
        opt.load_state_dict(state)
        assert_cuda(
            *model.parameters(),
            *model.buffers(),
            *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()),
        )
        for x, y in _calib(2):
            assert_cuda(_fine_tune_step(model, None, x, y, opt, cfg))
    assert (done, step) == (1, 1)


def test_ptq_calibration_and_inference(fake_cuda):
    """PTQ as ``finish`` runs it after fine-tuning: calibrate on CUDA batches, freeze, infer."""
    from effray.compress.config import CompressConfig
    from effray.compress.steps import finish

    cfg = CompressConfig(bits=8, quant_mode="ptq", finetune_epochs=0, calib_batches=2)
    model = build_model("convnet", 10, 3, 0.5)
    with fake_cuda:
        model = finish(model.to(CUDA), cfg, _calib())
        x, _ = _calib(1)[0]
        assert_cuda(model(x))


def test_kd_loss_on_device(fake_cuda):
    from effray.compress.distill import kd_loss

    with fake_cuda:
        s = torch.randn(8, 10, device=CUDA, requires_grad=True)
        soft_targets = torch.softmax(torch.randn(8, 10, device=CUDA), 1)
        for targets in (torch.randint(0, 10, (8,), device=CUDA), soft_targets):
            loss = kd_loss(s, torch.randn(8, 10, device=CUDA), targets, 4.0, 0.7)
            loss.backward()
            assert_cuda(loss, s.grad)


# ------------------------------------------------------------------ GAN


def test_gan_step(fake_cuda):
    """One discriminator and one generator step with fused Adam (what the GAN worker builds
    on a GPU); the losses come back as device tensors, not floats."""
    from effray.synth.gan import Discriminator, Generator, from_uint8, gan_step

    torch.manual_seed(0)
    g, d = Generator(10, 16, 8), Discriminator(10, 8)
    with fake_cuda:
        g, d = g.to(CUDA), d.to(CUDA)
        opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.0, 0.9), fused=True)
        opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.0, 0.9), fused=True)
        batch = uint8_batch()
        for _ in range(2):
            d_loss, g_loss = gan_step(g, d, opt_g, opt_d, from_uint8(batch["image"]), batch["label"], 16, 10)
            assert_cuda(d_loss, g_loss)


# ------------------------------------------------------------------ pipeline parallelism


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stage", [0, 1])
def test_pipeline_stage_forward_backward(fake_cuda, fake_process_group, schedule, stage):
    """One stage of a 2-stage pipeline over a process group that moves nothing: micro-batch
    forwards/backwards, the batched sends/receives, the loss all-reduce and predict, all
    on the device. The last stage learns the activation shape from a one-time header (a
    host read by design); here it is given the shape stage 0 would announce."""
    from effray.train.pipeline import PipelineStrategy
    from effray.train.stages import stage_bounds
    from effray.train.step import soft_cross_entropy

    fake_process_group(stage)
    torch.manual_seed(0)
    model = build_model("convnet", 10, 3, 0.5)
    cut = stage_bounds(model, 2)[1]
    with torch.no_grad():
        boundary = list(model[:cut](torch.zeros(1, 3, 32, 32)).shape[1:])
    strategy = PipelineStrategy(
        CUDA, channels_last=False, compile=False, amp=False, stages=2, microbatches=4, pipeline_schedule=schedule
    )
    with fake_cuda:
        part = strategy.prepare(model).train()
        if stage == 1:
            strategy._in_template = (boundary, torch.float32)  # stage 0's header, as received
        batch = _images(uint8_batch(16), False)
        images = batch["image"] if stage == 0 else None
        loss = strategy.forward_backward(part, images, batch, lambda y, b: soft_cross_entropy(y, b, 0.1))
        assert_cuda(loss, *(p.grad for p in part.parameters()))
        assert_cuda(strategy.predict(part.eval(), batch["image"]))


# ------------------------------------------------------------------ the harness itself


def test_python_backward_matches_the_engine():
    """The fake-CUDA backward walker gives the engine's gradients on real tensors: BN, a
    residual net, a custom autograd.Function (4-bit QAT) and a broadcast bias."""
    from fakecuda import python_backward

    from effray.compress.config import CompressConfig
    from effray.compress.steps import apply_quantization

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 0.25).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    apply_quantization(model, CompressConfig(bits=4, act_bits=8), [(x, y)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for walk in (torch.autograd.backward, python_backward):
        model.load_state_dict(state)  # the same forward twice: BN statistics and QAT ranges move
        model.zero_grad(set_to_none=True)
        walk(torch.nn.functional.cross_entropy(model(x), y))
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        if walk is torch.autograd.backward:
            expected = grads
    assert len(grads) == len(expected) > 20
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fake_cuda_catches_a_host_sync(fake_cuda):
    """The harness's other half: a value read on the host inside fake CUDA raises."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with fake_cuda:
        loss = torch.randn(4, device=CUDA).sum()
        with pytest.raises(DataDependentOutputException):
            float(loss)


def test_a_search_trials_shared_arrays_feed_a_step_on_the_device(fake_cuda):
    """An in-process Tune trial's epochs come from the driver's shared uint8 arrays: every
    batch lands on the trial's GPU (images and labels), is normalised there, and feeds a
    QAT + KD step with no host read."""
    import numpy as np

    from effray.compress.config import CompressConfig
    from effray.compress.distill import freeze_teacher
    from effray.compress.steps import apply_quantization, build_student, make_optimizer
    from effray.data.arrays import epoch_batches

    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 20).astype(np.int64),
        "index": np.arange(20, dtype=np.int64),
    }
    meta = {"num_classes": 10, "mean": MEAN, "std": STD}
    cfg = CompressConfig(bits=4, kd_alpha=0.5, calib_batches=2)
    teacher = build_model("convnet", 10, 3, 0.25)
    teacher.spec = dict(teacher.spec)
    student = build_student(teacher, cfg)
    with fake_cuda:
        teacher, student = freeze_teacher(teacher).to(CUDA), student.to(CUDA)
        apply_quantization(student, cfg, _calib())
        opt = make_optimizer(student, 0.01)
        batches = list(epoch_batches(arrays, meta, 8, policy="crop(4)|flip", seed=0, epoch=1, device=CUDA))
        assert [len(y) for _, y in batches] == [8, 8, 4]
        for x, y in batches:
            assert_cuda(x, y)
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert_cuda(_fine_tune_step(student.train(), teacher, x, y, opt, cfg))


def test_a_trials_final_scoring_keeps_the_logits_on_the_device(fake_cuda):
    """The scoring pass (``effray.metrics.device_pass``, under compression's ``accuracy`` and
    ``class_scores``, evaluation and training's validation): every batch's class sums,
    logits and labels are gathered on the GPU with no host read; only the finished pass
    goes to the host."""
    from effray.metrics import device_pass, sums_size

    model = build_model("convnet", 10, 3, 0.25).eval()
    with fake_cuda:
        model = model.to(CUDA)
        batches = _calib(3)
        sums, logits, labels = device_pass(lambda x: model(x.to(CUDA)), batches, keep_logits=True)
        assert_cuda(sums, logits, labels)
        assert sums.shape == (sums_size(10),) and sums.dtype == torch.float64
        assert logits.shape == (24, 10) and logits.dtype == torch.float32 and labels.shape == (24,)
        with pytest.raises(HostCopyError):  # the one read that follows, outside the pass
            logits.cpu()


def test_the_temperature_fit_stays_on_the_device_until_its_one_read(fake_cuda):
    """Post-hoc temperature scaling (``effray.metrics.temperature_tensor``) on a GPU's kept
    logits: the golden-section search narrows its bracket with ``torch.where`` and drops
    non-finite rows by weight, not by a mask index, so T is a GPU scalar until it is read."""
    from effray.metrics import temperature_tensor

    with fake_cuda:
        logits = torch.randn(24, 10, device=CUDA)
        labels = torch.randint(0, 10, (24,), device=CUDA)
        t = temperature_tensor(logits, labels)
        assert_cuda(t)
        assert t.shape == () and t.dtype == torch.float64
        with pytest.raises(HostCopyError):  # the one read, after the fit
            t.cpu()


def test_the_per_epoch_corruption_score_runs_on_the_device_until_its_one_read(fake_cuda, monkeypatch):
    """``--max-corruption-drop``'s per-epoch score (``CorruptionScore.copies`` made once on
    the host, then ``batches_accuracy`` each epoch, in a trial and on rank 0 of a Ray Train
    fine-tune): every corrupted uint8 batch is copied to the GPU student (fake-quant, 4
    bits) and scored there; the class sums reach the host only when the pass is done."""
    import numpy as np

    import effray.metrics
    from effray.compress.config import CompressConfig
    from effray.compress.steps import apply_quantization
    from effray.train.validate import CorruptionScore, batches_accuracy

    rng = np.random.default_rng(0)
    val = {
        "image": rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 12).astype(np.int64),
        "index": np.arange(12, dtype=np.int64),
    }
    score = CorruptionScore(("gaussian_noise", "contrast"), (1, 3), images=10, seed=0, every_epoch=True)
    copies = score.copies(val)
    assert isinstance(copies, list) and len(copies) == 4  # 2 corruptions x 2 severities, one batch each
    assert all(x.dtype == np.uint8 and x.shape == (10, 32, 32, 3) for x, _ in copies)
    read = []

    def host_read(sums: torch.Tensor, classes: int) -> dict:
        assert_cuda(sums)  # the whole pass is on the device when it is read
        read.append(classes)
        return {"accuracy": 0.5, "count": 40}

    monkeypatch.setattr(effray.metrics, "sums_metrics", host_read)
    student = build_model("convnet", 10, 3, 0.25)
    with fake_cuda:
        student = student.to(CUDA)
        apply_quantization(student, CompressConfig(bits=4, calib_batches=2), _calib())
        assert batches_accuracy(student, copies, {"num_classes": 10, "mean": MEAN, "std": STD}) == 0.5
        assert_cuda(*student.parameters())
    assert read == [10]


@pytest.mark.parametrize("recipe", ["unstructured-locked", "qat-4bit"])
def test_the_per_epoch_size_reads_a_cpu_copy_and_leaves_the_gpu_model_alone(fake_cuda, recipe):
    """``bytes_so_far`` saves a CPU copy of a GPU trial's model each epoch (``_on_cpu``): the
    copy is on the host without the sparsity lock's hooks, the GPU model keeps its device
    and its hooks, and a step still runs on the device afterwards. (The copy is the epoch's
    one deliberate host read, so the no-copy guard is off here.)"""
    import contextlib

    from effray.compress.config import CompressConfig
    from effray.compress.cost import _on_cpu
    from effray.compress.prune import lock_sparsity, prune_step
    from effray.compress.steps import apply_quantization

    def hooks(m: torch.nn.Module) -> int:
        return sum(len(s._forward_pre_hooks) + len(s._forward_hooks) for s in m.modules())

    model = build_model("resnet20", 10, 3, 0.25)
    with fake_cuda.fake:
        model = model.to(CUDA).train()
        lock = contextlib.nullcontext()
        if recipe == "qat-4bit":
            apply_quantization(model, CompressConfig(bits=4, calib_batches=2), _calib())
        else:
            prune_step(model, 0.5, "unstructured", "l1", batches=_calib())
            lock = lock_sparsity(model)
        with lock:
            before = hooks(model)
            copy = _on_cpu(model)
            assert all(t.device.type == "cpu" for t in [*copy.parameters(), *copy.buffers()])
            assert hooks(copy) == 0 and hooks(model) == before and (before > 0) == (recipe != "qat-4bit")
            assert_cuda(*model.parameters(), *model.buffers())
            x, y = _calib(1)[0]
            torch.nn.functional.cross_entropy(model(x), y).backward()
            assert_cuda(*(p.grad for p in model.parameters() if p.grad is not None))


@pytest.mark.parametrize("numerics", [{}, {"bf16": True, "channels_last": True}])
@pytest.mark.parametrize("student", [False, True])
def test_deployed_models_logits_stay_on_the_gpu(fake_cuda, numerics, student):
    """What ``effray predict``'s actors and ``effray serve``'s replicas run per batch on a
    GPU (:func:`effray.deploy.model.device_logits`): uint8 images copied to the device,
    normalised there, a trained model or a compressed student (fake-quant layers), with
    test-time views; the logits stay on the device until the caller takes them."""
    from effray.compress.config import CompressConfig
    from effray.compress.steps import finish
    from effray.deploy.model import ModelInfo, device_logits

    info = ModelInfo(
        classes=[str(c) for c in range(10)],
        image_shape=[32, 32, 3],
        mean=MEAN,
        std=STD,
        kind="artifact" if student else "checkpoint",
        source="-",
        numerics=numerics,
    )
    model = build_model("convnet", 10, 3, 0.5)
    with fake_cuda:
        model = model.to(CUDA)
        if student:
            model = finish(
                model,
                CompressConfig(bits=4, act_bits=8, quant_mode="ptq", finetune_epochs=0, calib_batches=2),
                _calib(),
            )
        model = model.eval()
        for tta in (0, 2):
            out = device_logits(model, uint8_batch(8)["image"], info, tta)
            assert_cuda(out)
            assert out.shape == (8, 10) and out.dtype == torch.float32


def test_cleaning_embeds_on_the_gpu(fake_cuda):
    """``effray data clean``'s embedding actor on a GPU: uint8 images copied once to the
    device, every zoom view and mirror through the classifier there, the features, pixel
    descriptors and probabilities left on it (the actor then makes its one host copy)."""
    from effray.clean.embed import ZOOMS, device_embedding
    from effray.models.predict import last_linear

    model = build_model("convnet", 10, 3, 0.5).eval()
    grabbed: list[torch.Tensor] = []
    last_linear(model).register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].flatten(1)))
    with fake_cuda:
        model = model.to(CUDA)
        views, probs = device_embedding(model, grabbed, uint8_batch(6)["image"], MEAN, STD)
        assert_cuda(views, probs)
        assert views.shape[:2] == (6, len(ZOOMS)) and probs.shape == (6, 10)


def test_cleaning_pixel_embedder_stays_on_the_gpu(fake_cuda):
    """The pixel embedder (``--embedder pixels``): thumbnails, the coarse and fine
    descriptors and the alignment search's views and best-view similarities, all on the
    images' device, no host read."""
    from effray.clean import pixels
    from effray.clean.embed import device_pixels

    with fake_cuda:
        out = device_pixels(uint8_batch(6)["image"])
        assert_cuda(*out.values())
        assert out["thumb"].dtype == torch.uint8 and out["coarse"].shape == (6, 2, 3 * pixels.COARSE**2)
        views = pixels.fine_views(out["thumb"])
        sims = pixels.best_view_similarity(views, out["fine"][:, None].expand(-1, 4, -1))
        assert_cuda(views, sims)
        assert views.shape == (6, pixels.VIEWS, 3 * pixels.FINE**2) and sims.shape == (6, 4)


def test_cleaning_fold_models_train_on_the_gpu(fake_cuda, monkeypatch):
    """A label-issue fold's (and the embedding model's) training, :func:`fit_arrays`, on a
    GPU: host arrays in, batches moved to the device, every step there. The model is built
    for real before fake CUDA starts (see conftest.py) and handed to ``fit_arrays``."""
    import numpy as np

    from effray.train import local
    from effray.train.local import fit_arrays

    built = build_model("convnet", 10, 3, 0.5)
    monkeypatch.setattr(local, "build_model", lambda *args, **kwargs: built)

    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 64),
        "index": np.arange(64),
    }
    meta = {"num_classes": 10, "image_shape": [32, 32, 3], "mean": MEAN, "std": STD}
    with fake_cuda:
        net = fit_arrays(arrays, meta, epochs=1, batch_size=32, device=CUDA)
        assert_cuda(*net.parameters(), *net.buffers())
