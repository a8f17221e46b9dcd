"""Feature distillation: the taps, the projections and the normalised term, and that the
student really learns the teacher's features through them (the recipe's own runs with
``kd_features`` are in test_compress_recipe.py and test_compress_run.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effray.compress.config import CompressConfig
from effray.compress.features import FeatureKD, Projector, feature_loss, projection
from effray.compress.steps import build_student
from effray.config import validated
from effray.errors import EffrayError
from effray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_projections_map_the_students_width_onto_the_teachers():
    assert isinstance(projection(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 2, 2)), nn.Identity)
    conv = projection(torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 4, 4))
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (16, 8, 1, 1)
    tokens = projection(torch.zeros(2, 5, 8), torch.zeros(2, 5, 12))
    assert isinstance(tokens, nn.Linear) and tokens(torch.zeros(2, 5, 8)).shape == (2, 5, 12)
    with pytest.raises(EffrayError, match="as many tokens"):
        projection(torch.zeros(2, 5, 8), torch.zeros(2, 7, 8))
    with pytest.raises(EffrayError, match="pair modules whose outputs"):
        projection(torch.zeros(2, 8), torch.zeros(2, 8, 4, 4))


def test_the_term_is_scale_free_and_pools_to_the_smaller_map():
    t = torch.randn(4, 8, 6, 6) * 50.0
    assert feature_loss([torch.zeros_like(t)], [t]).item() == pytest.approx(1.0, rel=1e-5)  # any scale: 1 at zero
    assert feature_loss([t.clone()], [t]).item() == pytest.approx(0.0, abs=1e-6)
    big = t.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # 12x12, the same map upsampled
    assert feature_loss([big], [t]).item() == pytest.approx(0.0, abs=1e-6)


def test_named_modules_a_model_lacks_fail_in_one_line_before_training():
    teacher = build_model("resnet20", 10, width=0.25)
    with pytest.raises(EffrayError, match="the teacher has no module 'nope'; name modules as"):
        build_student(teacher, validated(CompressConfig(kd_features="s1b0=nope")))
    with pytest.raises(EffrayError, match="the student has no module 'layer1'"):
        build_student(teacher, validated(CompressConfig(student="convnet", kd_features="layer1=s1b0")))
    with pytest.raises(EffrayError, match="--kd-feature-weight must be > 0"):
        validated(CompressConfig(kd_features="s1b0", kd_feature_weight=0.0))
    assert validated(CompressConfig(kd_features="a=b, c")).feature_pairs == {"a": "b", "c": "c"}


def test_a_narrower_student_learns_the_teachers_features_through_its_projections():
    """Gradients reach both the student and the projections: the term falls well below its
    start on the batch the student trains on, where widths differ (a 1x1 conv) and where
    they match (identity)."""
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10, width=0.5).eval()
    student = build_model("resnet20", 10, width=0.25).train()
    kd = FeatureKD({"s2b2": "s3b2", "s3b2": "s3b2"}, teacher)  # one teacher module may guide two
    x = torch.randn(16, 3, 32, 32)
    assert kd.attach(student, x[:1]) and not kd.attach(student, x[:1])  # built once for the same widths
    assert [type(m) for m in kd.projector.maps] == [nn.Conv2d, nn.Conv2d]
    before = [p.detach().clone() for p in (student.stem[0].weight, *kd.trainable())]
    opt = torch.optim.Adam([*student.parameters(), *kd.trainable()], lr=3e-3)
    losses = []
    for _ in range(40):
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = kd.loss(kd.projector)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    after = (student.stem[0].weight, *kd.trainable())
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # the first conv learnt too, far from the taps
    kd.detach()
    student(x)
    assert not kd.student_taps.outputs  # the hooks are gone with the fine-tune


def test_a_projector_is_one_module_for_ddp():
    maps = [nn.Conv2d(4, 8, 1), nn.Identity()]
    out = Projector(maps)([torch.zeros(1, 4, 2, 2), torch.ones(1, 3)])
    assert out[0].shape == (1, 8, 2, 2) and torch.equal(out[1], torch.ones(1, 3))


def test_feature_distillation_is_a_search_dimension():
    from ray import tune

    from effray.search.space import to_param_space, validate_space

    space = {"kd_features": {"choice": ["", "s2b2,s3b2"]}, "kd_feature_weight": {"loguniform": [0.1, 2.0]}}
    validate_space(space)
    assert isinstance(to_param_space(space)["compress"]["kd_features"], tune.search.sample.Categorical)
    with pytest.raises(EffrayError, match="space entry kd_feature_weight=0.0 is invalid: --kd-feature-weight"):
        validate_space({"kd_feature_weight": {"choice": [0.0, 1.0]}}, CompressConfig(kd_features="s2b2"))
