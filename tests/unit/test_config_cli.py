"""Configs: one dataclass definition -> CLI flags, dicts and back; the CLI's help and errors."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from effray.cli import _commands, build_parser, main
from effray.config import add_arguments, from_dict, from_namespace, merge, option, require, to_dict
from effray.errors import EffrayError, find_user_error


@dataclass(frozen=True)
class Inner:
    rate: float = option(0.5, "a rate")
    kind: str = option("a", "a kind", choices=("a", "b"))

    def validate(self) -> None:
        require(0 <= self.rate < 1, f"--rate must be in [0, 1), got {self.rate}")


@dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    epochs: int = option(2, "epochs")
    fast: bool = option(False, "go fast")
    sizes: tuple[int, ...] = option((1, 2), "sizes")


def test_flags_from_dataclass_roundtrip():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Outer)
    cfg = from_namespace(
        Outer, parser.parse_args(["--rate", "0.25", "--kind", "b", "--epochs", "3", "--fast", "--sizes", "4", "5"])
    )
    assert cfg == Outer(Inner(0.25, "b"), 3, True, (4, 5))
    assert to_dict(cfg) == {"inner": {"rate": 0.25, "kind": "b"}, "epochs": 3, "fast": True, "sizes": [4, 5]}
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert merge(cfg, {"inner": {"rate": 0.1}}) == Outer(Inner(0.1, "b"), 3, True, (4, 5))


def test_strict_dicts_and_validation():
    with pytest.raises(EffrayError, match="unknown Inner key.*rat.*valid: kind, rate"):
        from_dict(Outer, {"inner": {"rat": 0.1}})
    with pytest.raises(EffrayError, match=r"--rate must be in \[0, 1\), got 1.5"):
        from_dict(Outer, {"inner": {"rate": 1.5}})


def test_find_user_error_unwraps_chains():
    inner = EffrayError("fix it")
    try:
        try:
            raise inner
        except EffrayError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert find_user_error(outer) is inner
    assert find_user_error(RuntimeError("no")) is None


def test_help_lists_every_command_and_each_has_defaults(capsys):
    parser = build_parser()
    top = parser.format_help()
    commands = _commands()
    assert {"data prepare", "data preview"} <= {" ".join(c.path) for c in commands}
    for cmd in commands:
        assert cmd.path[0] in top
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*cmd.path, "--help"])
        assert exc.value.code == 0
        assert "(default:" in capsys.readouterr().out


def test_console_script_and_bad_flag():
    out = subprocess.run([sys.executable, "-m", "effray.cli", "--help"], capture_output=True, text=True, check=True)
    assert "commands" in out.stdout
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare", "--no-such-flag"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "--data", "d", "--workers", "2-3", "--batch-size", "60", "--resize-timeout-s", "0"],
            "--resize-timeout-s must be > 0",
        ),
        (["train", "--data", "d", "--grow-check-s", "-1"], "--grow-check-s and --resize-timeout-s must be > 0"),
        (
            ["compress", "--teacher", "t", "--data", "d", "--out", "o", "--max-failures", "-2"],
            "--max-failures must be >= -1",
        ),
        (
            [
                "compress",
                "--teacher",
                "t",
                "--data",
                "d",
                "--out",
                "o",
                "--finetune-epochs",
                "2",
                "--inject-failure-at-epoch",
                "3",
            ],
            "--inject-failure-at-epoch must be -1 or 1..2",
        ),
    ],
)
def test_failover_flags_refuse_bad_values_in_one_line(args, message, capsys):
    """The elastic and restart knobs: a bad value is exit 2 and one line naming the flag."""
    assert main(["--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_auto_flag_parses_auto_and_numbers_and_shows_auto_in_help(capsys):
    from effray.train.config import TrainConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    assert from_namespace(TrainConfig, parser.parse_args(["--data", "d"])).cpus_per_worker == 0.0
    assert (
        from_namespace(TrainConfig, parser.parse_args(["--data", "d", "--cpus-per-worker", "auto"])).cpus_per_worker
        == 0.0
    )
    assert (
        from_namespace(TrainConfig, parser.parse_args(["--data", "d", "--cpus-per-worker", "1.5"])).cpus_per_worker
        == 1.5
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--cpus-per-worker", "lots"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "(default: auto)" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


@pytest.mark.parametrize("job", sorted(p.name for p in (Path(__file__).parents[2] / "jobs").glob("*.py")))
def test_every_job_entrypoint_names_a_command_of_the_cli(job, capsys):
    """A job is `effray <command> ...` under `ray job submit`: its command must exist (help exits 0)."""
    text = (Path(__file__).parents[2] / "jobs" / job).read_text()
    command = re.search(r"main\(\[((?:\"[a-z]+\", )+)\*sys\.argv\[1:\]\]\)", text)
    assert command, f"jobs/{job} does not call main([...command..., *sys.argv[1:]])"
    words = re.findall(r'"([a-z]+)"', command.group(1))
    with pytest.raises(SystemExit) as exc:
        main([*words, "--help"])
    assert exc.value.code == 0 and "usage: effray " + " ".join(words) in capsys.readouterr().out


def test_a_files_numbers_are_read_as_their_flags_read_them():
    """A preset or saved config (``from_dict``) takes what the flag takes: ``auto`` where the
    flag does, numbers written as text, ints for floats, numpy scalars (a searcher's
    samples); anything else is one line naming the key, not a TypeError in validation."""
    import numpy as np

    from effray.compress.config import CompressConfig
    from effray.config import AUTO, from_dict
    from effray.train.config import TrainConfig

    train = from_dict(TrainConfig, {"cpus_per_worker": "auto", "epochs": "3", "lr": 1})
    assert (train.cpus_per_worker, train.epochs, train.lr) == (AUTO, 3, 1.0) and isinstance(train.lr, float)
    cfg = from_dict(CompressConfig, {"finetune_epochs": np.int64(2), "prune_rate": np.float64(0.3)})
    assert type(cfg.finetune_epochs) is int and cfg.finetune_epochs == 2 and cfg.prune_rate == 0.3
    for bad, words in (
        ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
        ({"epochs": "x"}, "epochs must be an integer, got 'x'"),
        ({"epochs": True}, "epochs must be an integer, got True"),
        ({"cpus_per_worker": "lots"}, "cpus_per_worker must be a number or auto, got 'lots'"),
        ({"lr": [0.1]}, "lr must be a number, got [0.1]"),
    ):
        with pytest.raises(EffrayError, match=re.escape(words)):
            from_dict(TrainConfig, bad)
