"""`effray synth train`: the GAN on Ray Train (DDP), checkpointed every epoch, resumable.

Two levels, like `effray train`: :func:`gan_loop_per_worker` holds all torch code;
:func:`train_gan` checks the input, builds the ``TorchTrainer`` with the deterministic
run name ``--out/--name`` (Ray Train V2 restores a run by ``RunConfig(name,
storage_path)``) and, when the fit ends, writes ``OUT/generator.pt``: the generator
alone, with its architecture, classes, latent size and the data's checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effray import __version__
from effray.atomic import write_file, write_json
from effray.config import from_dict, require, to_dict
from effray.console import say
from effray.data.pipeline import DataConfig, torch_batches, train_dataset, validate_data_dir
from effray.errors import EffrayError
from effray.synth.config import NOT_ARCH, SynthTrainConfig
from effray.synth.gan import Discriminator, Generator, from_uint8, gan_step
from effray.train.checkpoint import (
    FORMATS,
    checkpoint_file,
    data_summary,
    read_payload,
    rng_state,
    save_payload,
    set_rng_state,
)
from effray.train.parallel import STRATEGIES
from effray.train.run import provenance
from effray.train.session import all_sum, from_rank0, restore, seed_epoch
from effray.train.trainer import check_resources, fit, torch_trainer

GAN_FORMAT = "effray.synth.gan/1"  # resumable training state (both networks + optimizers)
GENERATOR_FORMAT = "effray.synth.generator/1"  # the artifact: generator weights + what they mean
GENERATOR_FILE = "generator.pt"
RUN_FILE = "synth-run.json"
HISTORY_FILE = "history.jsonl"


def _plain(x: Any) -> Any:
    # JSON round trip: only plain types reach the weights-only pickle
    return json.loads(json.dumps(x, default=str))


def generator_payload(
    g_state: dict[str, torch.Tensor],
    spec: dict[str, Any],
    data: dict[str, Any],
    config: dict[str, Any],
    history: list[dict[str, Any]],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The self-describing generator: ``load_generator`` needs nothing else."""
    return {
        "format": GENERATOR_FORMAT,
        "generator": g_state,
        "spec": _plain(spec),
        "num_classes": int(spec["num_classes"]),
        "classes": list(data["classes"]),
        "z_dim": int(spec["z_dim"]),
        "data": _plain(data),
        "config": _plain(config),
        "history": _plain(history),
        "provenance": {"effray_version": __version__, **_plain(provenance)},
    }


@FORMATS.register(GENERATOR_FORMAT)
def build_generator(payload: dict[str, Any]) -> nn.Module:
    """The generator a ``effray synth train`` payload describes, its weights loaded: what the
    checkpoint loader returns for that format, and what each sampling actor holds."""
    g = Generator(**payload["spec"])
    try:
        g.load_state_dict(payload["generator"])
    except RuntimeError as exc:
        raise EffrayError(f"generator weights don't fit {payload['spec']}: {str(exc).splitlines()[0]}") from None
    return g


def load_generator(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """``(generator in eval mode, payload)``; anything else is a one-line EffrayError."""
    payload = read_payload(path)
    require(
        payload.get("format") == GENERATOR_FORMAT,
        f"{checkpoint_file(path)} is a {payload.get('format')!r} checkpoint, not a generator; "
        f"pass the {GENERATOR_FILE} written by `effray synth train`",
    )
    for key in ("spec", "generator", "classes", "num_classes", "z_dim"):
        require(
            key in payload,
            f"{checkpoint_file(path)} lacks {key!r}; re-export it with `effray synth train`",
        )
    return build_generator(payload).eval(), payload


# ------------------------------------------------------------------ worker


def gan_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: restore, then per epoch stream this rank's shard
    of real images (flipped), take one D and one G step per batch, report and checkpoint."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(SynthTrainConfig, config["train"])
    run = config["run"]
    data = run["data"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    num_classes, channels = int(data["num_classes"]), int(data["image_shape"][2])
    g = Generator(num_classes, cfg.z_dim, cfg.gen_width, channels)
    d = Discriminator(num_classes, cfg.disc_width, channels)
    restored = restore(rank)
    payload = restored[1] if restored else None
    if payload is not None:
        g.load_state_dict(payload["generator"])
        d.load_state_dict(payload["discriminator"])
    g, d = ray.train.torch.prepare_model(g), ray.train.torch.prepare_model(d)
    betas = (cfg.beta1, cfg.beta2)
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel per step, step counts on the GPU
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=betas, **fused)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=betas, **fused)
    start, history, elapsed = 0, [], 0.0
    if payload is not None:
        opt_g.load_state_dict(payload["opt_g"])
        opt_d.load_state_dict(payload["opt_d"])
        set_rng_state(payload["rng"], device)
        start, history, elapsed = int(payload["epoch"]), list(payload["history"]), float(payload["elapsed_s"])
    token = random.SystemRandom().randrange(16**6)
    start, token = from_rank0([start, token], device)
    if rank == 0 and payload is not None:
        say(f"[effray] resuming GAN {run['name']} from {restored[0]} (epoch {start}/{cfg.epochs})")
    unwrap = lambda m: m.module if hasattr(m, "module") else m  # noqa: E731
    shard = ray.train.get_dataset_shard("train")
    meta = {"mean": data["mean"], "std": data["std"]}
    per_worker = cfg.batch_size // cfg.workers
    for epoch in range(start, cfg.epochs):
        seed_epoch(cfg.seed, epoch, rank)
        g.train()
        d.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # NCCL reduces device tensors
        for batch in torch_batches(
            shard,
            meta,
            per_worker,
            clock=run["clock"],
            epoch=epoch,
            shuffle_buffer=1024,
            seed=cfg.seed,
            normalise=False,
        ):
            # BatchNorm needs two rows; shards are equal, so every rank skips the same batch
            if len(batch["label"]) < 2:
                continue
            # uint8 to the device (a quarter of float's bytes), scaled there
            real, labels = (
                from_uint8(batch["image"].to(device, non_blocking=True)),
                batch["label"].to(device, non_blocking=True),
            )
            d_loss, g_loss = gan_step(g, d, opt_g, opt_d, real, labels, cfg.z_dim, num_classes)
            sums += torch.stack([d_loss.double(), g_loss.double(), torch.ones((), dtype=torch.float64, device=device)])
        seconds = time.perf_counter() - t0
        elapsed += seconds
        sums = all_sum(sums).cpu()  # losses averaged over every rank's steps
        steps = max(float(sums[2]), 1.0)
        metrics = {
            "epoch": epoch + 1,
            "d_loss": float(sums[0]) / steps,
            "g_loss": float(sums[1]) / steps,
            "steps": int(sums[2]) // ctx.get_world_size(),
            "epoch_s": seconds,
            "elapsed_s": elapsed,
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory(prefix="effray-gan-") as tmp:
            ckpt = None
            if rank == 0:
                say(
                    f"[effray] GAN epoch {epoch + 1}/{cfg.epochs}  d_loss {metrics['d_loss']:.4f}  "
                    f"g_loss {metrics['g_loss']:.4f}  {seconds:.1f}s"
                )
                _append_history(run["run_dir"], {**metrics, "attempt": f"{token:06x}"})
                save_payload(
                    tmp,
                    {
                        "format": GAN_FORMAT,
                        "generator": unwrap(g).state_dict(),
                        "discriminator": unwrap(d).state_dict(),
                        "opt_g": opt_g.state_dict(),
                        "opt_d": opt_d.state_dict(),
                        "epoch": epoch + 1,
                        "rng": rng_state(device),
                        "g_spec": dict(unwrap(g).spec),
                        "config": _plain(config["train"]),
                        "data": _plain(data),
                        "history": _plain(history),
                        "elapsed_s": elapsed,
                    },
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch + 1:04d}-{token:06x}")


def _append_history(run_dir: str, record: dict[str, Any]) -> None:
    """Every epoch actually run, across restarts and re-runs: how "no epoch ran twice" is checked."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / HISTORY_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------ driver


def _check_existing(run_dir: Path, cfg: SynthTrainConfig) -> None:
    f = run_dir / RUN_FILE
    if not f.is_file():
        return
    old = {k: v for k, v in json.loads(f.read_text())["config"].items() if k not in NOT_ARCH}
    new = {k: v for k, v in to_dict(cfg).items() if k not in NOT_ARCH}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    require(
        not diff,
        f"run {cfg.name!r} in {cfg.out} was trained with other {', '.join('--' + k.replace('_', '-') for k in diff)}; "
        "use the same values to resume it, or another --name/--out",
    )


def _lines(path: Path) -> int:
    return sum(1 for _ in path.open()) if path.is_file() else 0


def train_gan(cfg: SynthTrainConfig) -> dict[str, Any]:
    """Train (or resume) the GAN on the current Ray cluster; write ``OUT/generator.pt``."""
    import ray

    meta = validate_data_dir(cfg.data)
    require(
        meta["image_shape"][:2] == [32, 32],
        f"the GAN makes 32x32 images; {cfg.data} holds {meta['image_shape']}",
    )
    require(meta["counts"].get("train", 0) > 0, f"dataset {cfg.data} has no training rows")
    check_resources(cfg, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    rows = min(meta["counts"]["train"], cfg.limit or meta["counts"]["train"])
    require(
        rows // cfg.workers >= 2,
        f"{rows} training rows can't feed {cfg.workers} workers; use fewer --workers",
    )
    out = Path(cfg.out).expanduser().resolve()
    require(not out.exists() or out.is_dir(), f"--out {cfg.out} exists and is not a directory")
    cfg = dataclasses.replace(cfg, out=str(out))
    run_dir = out / cfg.name
    _check_existing(run_dir, cfg)
    data, prov = data_summary(meta), provenance(meta)
    if not (run_dir / RUN_FILE).is_file():
        write_json(
            run_dir / RUN_FILE,
            {"config": to_dict(cfg), "data": data, "provenance": prov, "created": time.time()},
        )
    before = _lines(run_dir / HISTORY_FILE)
    clock = f"effray-gan-clock-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]}"
    ds = train_dataset(
        DataConfig(data=cfg.data, augment=cfg.augment, seed=cfg.seed),
        clock=clock,
        num_cpus=cfg.data_cpus,
    )
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    trainer = torch_trainer(
        gan_loop_per_worker,
        {
            "train": to_dict(cfg),
            "run": {"name": cfg.name, "run_dir": str(run_dir), "clock": clock, "data": data, "provenance": prov},
        },
        workers=cfg.workers,
        cpus_per_worker=cfg.cpus_per_worker,
        gpus_per_worker=cfg.gpus_per_worker,
        name=cfg.name,
        storage=str(out),
        max_failures=cfg.max_failures,
        keep_checkpoints=cfg.keep_checkpoints,
        datasets={"train": ds},
        dataset_config=STRATEGIES.get("ddp").dataset_config(train_ds=ds),
    )
    result = fit(trainer, clock)
    require(result.checkpoint is not None, f"GAN run {run_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = read_payload(d)
    require(state.get("format") == GAN_FORMAT, f"{result.checkpoint.path} is not a GAN checkpoint")
    f = out / GENERATOR_FILE
    artifact = generator_payload(state["generator"], state["g_spec"], data, to_dict(cfg), state["history"], prov)
    write_file(f, lambda tmp: torch.save(artifact, tmp))
    last = state["history"][-1] if state["history"] else {}
    return {
        "generator": str(f),
        "run_dir": str(run_dir),
        "epochs": int(state["epoch"]),
        "epochs_run_now": _lines(run_dir / HISTORY_FILE) - before,
        **{k: last[k] for k in ("d_loss", "g_loss", "elapsed_s") if k in last},
        "steps_per_epoch": math.ceil(rows / cfg.batch_size),
    }
