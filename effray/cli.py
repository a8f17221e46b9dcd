"""The ``effray`` command line. Only this module and ``jobs/`` read argv and the environment.

Each subcommand is one config dataclass (its fields are the flags, defaults shown in
``--help``) and one function from the pipeline stage it belongs to. Every command ends
by printing one JSON line with its results; a user mistake is one ``effray: error:``
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effray import __version__
from effray.clean.config import CleanConfig
from effray.clean.run import clean
from effray.cluster import check_output_paths, init_ray
from effray.compress.config import CompressRunConfig
from effray.compress.run import compress
from effray.compress.sensitivity import SensitivityConfig
from effray.compress.sensitivity_run import sensitivity
from effray.config import add_arguments, from_namespace, to_dict
from effray.console import ray_output_to, say
from effray.data.prepare import PrepareConfig, prepare
from effray.data.preview import PreviewConfig, preview
from effray.deploy.batch import predict
from effray.deploy.config import ExportConfig, PredictConfig, ServeConfig
from effray.deploy.export import export
from effray.deploy.serve import serve
from effray.errors import find_user_error
from effray.evaluate import EvaluateConfig, evaluate
from effray.run import RunConfig, run_all
from effray.search.aggregate import ReportConfig, report
from effray.search.config import TuneConfig
from effray.search.driver import tune_compression
from effray.synth.config import SynthSampleConfig, SynthScoreConfig, SynthTrainConfig
from effray.synth.quality import score as synth_score
from effray.synth.sample import sample as synth_sample
from effray.synth.train import train_gan
from effray.tracking import decide_wandb_mode
from effray.train import train
from effray.train.config import TrainConfig


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]
    help: str
    config: type
    run: Callable[[Any], dict[str, Any]]
    needs_ray: bool | Callable[[Any], bool] = True  # or: whether this config needs it

    def uses_ray(self, cfg: Any) -> bool:
        return self.needs_ray(cfg) if callable(self.needs_ray) else self.needs_ray


def _prepare(cfg: PrepareConfig) -> dict[str, Any]:
    meta = prepare(cfg)
    return {
        "out": os.path.abspath(cfg.out),
        "counts": meta["counts"],
        "classes": meta["num_classes"],
        "image_shape": meta["image_shape"],
        "skipped_bad": meta["skipped_bad"],
        "decoded_on_nodes": meta.get("decoded_on", []),
    }


def with_wandb_mode(run: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """The one place that reads WANDB_MODE / WANDB_API_KEY; workers and trials get the decision."""

    def decided(cfg: Any) -> dict[str, Any]:
        mode = decide_wandb_mode(cfg.wandb_mode, os.environ, disabled=not cfg.wandb)
        return run(dataclasses.replace(cfg, wandb_mode=mode))

    return decided


def _commands() -> list[Command]:
    """Every command: its words, its help, its config (the flags) and the function it runs."""
    return [
        Command(
            ("data", "prepare"),
            "convert a CIFAR/folder/Parquet/synthetic source into effray's canonical Parquet dataset",
            PrepareConfig,
            _prepare,
        ),
        Command(
            ("data", "preview"),
            "stream the augmented training split through Ray Data: throughput and a PNG grid",
            PreviewConfig,
            preview,
        ),
        Command(
            ("data", "clean"),
            "find exact and near duplicates, leaks between splits (and --reference) and label issues on Ray; writes "
            "removed.parquet, clean_report.md/.json, PNG grids, and with --drop a cleaned dataset",
            CleanConfig,
            clean,
        ),
        Command(
            ("train",),
            "train a model on Ray Train: data-parallel (DDP) or pipeline stages x data-parallel (--parallel "
            "pipeline); re-running the same --storage/--name resumes",
            TrainConfig,
            with_wandb_mode(train),
        ),
        Command(
            ("evaluate",),
            "accuracy, loss, per-class precision/recall/F1, confusion and calibration of a checkpoint on a prepared "
            "dataset or image Parquet",
            EvaluateConfig,
            evaluate,
            needs_ray=lambda cfg: bool(cfg.corruptions),
        ),
        Command(
            ("compress",),
            "compress a teacher (prune, k-bit quantize, distil), fine-tuning on Ray Train; writes the artifact and "
            "metrics.json",
            CompressRunConfig,
            compress,
        ),
        Command(
            ("sensitivity",),
            "per-layer sensitivity on Ray: each conv/linear layer alone at each bit width and prune rate, scored on "
            "val images with no fine-tune; writes sensitivity.parquet and a heat map; a rerun reuses finished layers",
            SensitivityConfig,
            sensitivity,
        ),
        Command(
            ("tune",),
            "Ray Tune search over pruning/quantization/distillation of a teacher; re-running the same "
            "--storage/--name resumes",
            TuneConfig,
            with_wandb_mode(tune_compression),
        ),
        Command(
            ("run",),
            "the main job: prepare -> train a teacher -> tune compression -> report, on the current Ray cluster",
            RunConfig,
            run_all,
        ),
        Command(
            ("synth", "train"),
            "train a class-conditional GAN (SN projection discriminator, hinge loss) on Ray Train; re-running the "
            "same --out/--name resumes; writes OUT/generator.pt",
            SynthTrainConfig,
            train_gan,
        ),
        Command(
            ("synth", "sample"),
            "generate --per-class synthetic images per class with Ray Data into a canonical dataset (synthetic=true) "
            "+ samples.png; --classifier adds quality.json",
            SynthSampleConfig,
            synth_sample,
        ),
        Command(
            ("synth", "score"),
            "class consistency, diversity and an FID-style distance (our classifier's features, not Inception) of a "
            "synthetic dataset",
            SynthScoreConfig,
            synth_score,
            needs_ray=False,
        ),
        Command(
            ("export",),
            "export a compressed artifact or checkpoint as a torch.export program (.pt2) or ONNX, optionally int8, "
            "each checked against the artifact on held-out data",
            ExportConfig,
            export,
            needs_ray=False,
        ),
        Command(
            ("predict",),
            "batch inference on Ray Data: predictions (class, probability, top-k) of a model over a dataset or a "
            "folder of images, as Parquet",
            PredictConfig,
            predict,
        ),
        Command(
            ("serve",),
            "serve a model over HTTP on Ray Serve (POST /predict, GET /healthz), with dynamic batching; binds "
            "127.0.0.1 unless --host says otherwise",
            ServeConfig,
            serve,
        ),
        Command(
            ("report",),
            "aggregate an experiment into results.parquet/.csv, report.md and pareto.png (+ the best model within a "
            "budget)",
            ReportConfig,
            report,
            needs_ray=False,
        ),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effray", description="Train, compress and measure CIFAR classifiers on Ray.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"effray {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="parse and validate the command's flags, print the resolved config as JSON, run nothing",
    )
    groups: dict[tuple[str, ...], Any] = {(): parser.add_subparsers(title="commands", metavar="COMMAND")}
    for cmd in _commands():
        for depth in range(1, len(cmd.path)):
            prefix = cmd.path[:depth]
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                groups[prefix] = sub.add_subparsers(title=f"{prefix[-1]} commands", metavar="COMMAND")
                sub.set_defaults(_usage=sub)
        p = groups[cmd.path[:-1]].add_parser(
            cmd.path[-1],
            help=cmd.help,
            description=cmd.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            allow_abbrev=False,
        )
        add_arguments(p, cmd.config)
        p.set_defaults(_command=cmd)
    parser.set_defaults(_usage=parser)
    return parser


def _ray_running() -> bool:
    """Whether this process already joined Ray (a test session, a notebook): then it stays up."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def log_path(command: tuple[str, ...], cfg: Any) -> Path:
    """Where a command's Ray output goes: ``OUT/logs`` for ``effray run`` (the main job's
    own directory), the temp dir's ``effray-logs`` for the others, so that a command that
    fails on bad input leaves nothing in the user's directories."""
    name = f"{'-'.join(command)}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    out = getattr(cfg, "out", "")
    if command == ("run",) and isinstance(out, str) and out and "://" not in out:
        return Path(out).absolute() / "logs" / name
    return Path(tempfile.gettempdir()) / "effray-logs" / name


def _elastic_workers(argv: list[str]) -> list[str]:
    """``train --workers MIN-MAX`` -> ``--workers MIN --max-workers MAX`` (elastic training)."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] != "train":
        return argv
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        value = (
            a.split("=", 1)[1]
            if a.startswith("--workers=")
            else argv[i + 1]
            if a == "--workers" and i + 1 < len(argv)
            else None
        )
        m = re.fullmatch(r"(\d+)-(\d+)", value or "")
        if m:
            out += ["--workers", m.group(1), "--max-workers", m.group(2)]
            i += 1 if a.startswith("--workers=") else 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C and `ray job stop` (SIGINT) must interrupt cleanly even when an ancestor
    # ignored SIGINT (anything started with `&` from a script does): ignoring survives exec
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(_elastic_workers(list(sys.argv[1:] if argv is None else argv)))
    cmd: Command | None = getattr(args, "_command", None)
    if cmd is None:
        args._usage.print_help()
        return 2
    if not args.verbose:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    log_file = None
    try:
        cfg = from_namespace(cmd.config, args)
        check_output_paths(cfg, os.environ)  # a relative --out/--storage would vanish with a Ray job's working dir
        if args.dry_run:
            plan = {"plan": cfg.plan()} if hasattr(cfg, "plan") else {}  # a multi-stage command: each stage's config
            print(
                json.dumps(
                    {"dry_run": True, "command": " ".join(cmd.path), "config": to_dict(cfg), **plan}, default=str
                )
            )
            return 0
        needs_ray = cmd.uses_ray(cfg)
        log_file = None if args.verbose or not needs_ray else log_path(cmd.path, cfg)
        with ray_output_to(log_file):
            if log_file is not None:
                say(f"[effray] Ray's own output: {log_file} (--verbose shows it here)")
            started_ray = needs_ray and not _ray_running()
            if needs_ray:
                init_ray(verbose=args.verbose)  # RAY_ADDRESS's cluster (as under `ray job submit`), or a local one
            result = cmd.run(cfg)
            if started_ray and log_file is not None:  # not when interrupted: `ray job stop` waits only seconds
                import ray

                ray.shutdown()  # its log threads flush into the log, not onto the terminal after the result
    except KeyboardInterrupt:
        print("effray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None:
            if log_file is not None:
                print(f"effray: failed; Ray's output is in {log_file}", file=sys.stderr)
            raise
        print(f"effray: error: {str(user_error.args[0]) if user_error.args else user_error}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
