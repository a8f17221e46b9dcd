"""CompressConfig: bad input is one line; the config round-trips through flags and dicts."""

from __future__ import annotations

import argparse

import pytest

from effray.compress.config import CompressConfig
from effray.config import add_arguments, from_dict, from_namespace, to_dict, validated
from effray.data.pipeline import DataConfig
from effray.errors import EffrayError


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("prune_rate", 1.0, r"--prune-rate must be in \[0, 1\)"),
        ("prune_rate", -0.2, r"--prune-rate must be in \[0, 1\)"),
        ("bits", 1, "--bits must be 2..8"),
        ("bits", 9, "--bits must be 2..8"),
        ("first_layer_bits", 16, "--first-layer-bits must be 2..8"),
        ("act_bits", 0, "--act-bits must be 2..8"),
        ("kd_temperature", 0.0, "--kd-temperature must be > 0"),
        ("kd_temperature", -2.0, "--kd-temperature must be > 0"),
        ("kd_alpha", 1.5, r"--kd-alpha must be in \[0, 1\]"),
        ("prune_kind", "random", "--prune-kind must be one of"),
        ("student", "resnet7", "unknown --student 'resnet7'"),
        ("prune_steps", 0, "--prune-steps must be >= 1"),
        ("qat_bn", "freeze", "--qat-bn must be one of simulate, fold"),
    ],
)
def test_bad_input_is_one_line(field, value, message):
    with pytest.raises(EffrayError, match=message) as err:
        validated(CompressConfig(**{field: value}))
    assert "\n" not in str(err.value)


def test_defaults_are_valid_and_mean_nothing_is_done():
    cfg = validated(CompressConfig())
    assert not cfg.prunes and not cfg.quantizes and not cfg.distills
    assert validated(CompressConfig(bits=32, act_bits=8)).quantizes is False


def test_flags_and_dicts_round_trip_next_to_the_data_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser, CompressConfig)
    add_arguments(parser, DataConfig)  # no flag clashes with the data pipeline's
    ns = parser.parse_args(
        [
            "--prune-rate",
            "0.5",
            "--prune-kind",
            "structured",
            "--bits",
            "4",
            "--kd-alpha",
            "0.9",
            "--no-int8",
            "--data",
            "d",
        ]
    )
    cfg = from_namespace(CompressConfig, ns)
    assert (cfg.prune_rate, cfg.prune_kind, cfg.bits, cfg.kd_alpha, cfg.int8) == (0.5, "structured", 4, 0.9, False)
    assert from_dict(CompressConfig, to_dict(cfg)) == cfg
    assert all(isinstance(v, (int, float, str, bool)) for v in to_dict(cfg).values())  # Tune-searchable
