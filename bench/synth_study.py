"""Does GAN data help? The same classifier with 0%, 10% and 25% synthetic rows in its stream.

On a subset of the shared CIFAR-10 file (``--rows``, stratified 90/10 train/val split;
the val split never reaches the GAN or the classifiers' training): train the
class-conditional GAN with `effray synth train` (Ray Train), train the classifier on
real data only, sample ``--per-class`` images per class with `effray synth sample`
(Ray Data) scoring them with that classifier, then train the same classifier again
with 10% and 25% of its stream synthetic. Same budget for every run: the same number
of optimizer steps of the same batch size, same seed, same one-cycle LR schedule and
the same per-epoch random crop+flip (synthetic rows too). Prints the GAN's training
time and quality figures and one table row per ratio; everything lands in
``--work/results.json``.

    python bench/synth_study.py [--rows 10000] [--gan-epochs 3] [--steps 700] [--generator CKPT]

Sized for ~15 minutes end to end on 2 idle cores; pass --generator to skip the GAN.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from effray.atomic import write_json
from effray.cluster import init_ray
from effray.data.arrays import prepared_batches
from effray.data.clock import epoch_clock, kill_clock
from effray.data.pipeline import DataConfig, torch_batches, train_dataset
from effray.data.prepare import PrepareConfig, load_meta, prepare
from effray.evaluate import score
from effray.models import build_model
from effray.synth.config import SynthSampleConfig, SynthTrainConfig
from effray.synth.sample import sample
from effray.synth.train import train_gan
from effray.train.checkpoint import data_summary, save_payload, train_payload
from effray.train.step import Schedule, param_groups

ROOT = Path(__file__).resolve().parents[1]


def train_classifier(
    data: str, synthetic: str, ratio: float, args: argparse.Namespace
) -> tuple[torch.nn.Module, float, int]:
    """``args.steps`` SGD steps on the (mixed) augmented stream; returns (model, seconds, epochs)."""
    meta = load_meta(data)
    torch.manual_seed(args.seed)
    model = build_model(args.model, meta["num_classes"], 3, args.width)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule("onecycle", args.steps, args.steps // 5))
    clock = f"effray-synth-study-{int(ratio * 100)}"
    epoch_clock(clock)
    cfg = DataConfig(
        data=data,
        augment="standard",
        seed=args.seed,
        synthetic=synthetic if ratio else "",
        synthetic_ratio=ratio,
    )
    ds = train_dataset(cfg, clock=clock)
    step, epoch, t0 = 0, 0, time.perf_counter()
    model.train()
    try:
        while step < args.steps:
            for batch in torch_batches(
                ds, meta, args.batch, clock=clock, epoch=epoch, shuffle_buffer=4096, seed=args.seed
            ):
                if step == args.steps:
                    break
                loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"], label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
            epoch += 1
    finally:
        kill_clock(clock)
    return model.eval(), time.perf_counter() - t0, epoch


def val_accuracy(model: torch.nn.Module, data: str) -> float:
    meta, batches = prepared_batches(data, "val", 500)
    return score(model, batches, meta["mean"], meta["std"], meta["num_classes"], 500)["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parquet", default=str(ROOT.parent / "shared" / "data" / "cifar10-train.parquet"))
    p.add_argument("--work", default=str(ROOT / "runs" / "synth-study"))
    p.add_argument("--rows", type=int, default=10000, help="source rows used (90%% train, 10%% val)")
    p.add_argument("--gan-epochs", type=int, default=3)
    p.add_argument("--gan-width", type=int, default=32, help="generator and discriminator base channels")
    p.add_argument("--generator", default="", help="use this generator.pt instead of training one")
    p.add_argument("--model", default="convnet")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=700, help="classifier optimizer steps (every ratio)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--ratios", default="0,0.1,0.25")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.set_num_threads(1)  # the Ray Data augment task gets the other core
    work = Path(args.work)
    init_ray(num_cpus=2)
    data = work / "data"
    if not (data / "meta.json").is_file():
        prepare(
            PrepareConfig(
                source=args.parquet,
                out=str(data),
                limit=args.rows,
                val_fraction=0.1,
                test_fraction=0.0,
                seed=args.seed,
            )
        )
    meta = load_meta(data)
    n_train = meta["counts"]["train"]
    print(f"data: {n_train} train / {meta['counts']['val']} val rows of {args.parquet}")

    results: dict = {"args": vars(args), "data_checksum": meta["source_checksum"]}
    generator = args.generator
    if not generator:
        t0 = time.perf_counter()
        gan = train_gan(
            SynthTrainConfig(
                data=str(data),
                out=str(work / "gan"),
                epochs=args.gan_epochs,
                gen_width=args.gan_width,
                disc_width=args.gan_width,
                seed=args.seed,
            )
        )
        results["gan"] = {**gan, "wall_s": time.perf_counter() - t0}
        generator = gan["generator"]
        print(
            f"GAN: {gan['epochs']} epochs, {results['gan']['wall_s']:.0f} s wall, d_loss {gan['d_loss']:.3f}, g_loss "
            f"{gan['g_loss']:.3f}"
        )

    rows = []
    real_model, secs, epochs = train_classifier(str(data), "", 0.0, args)
    rows.append(
        {
            "ratio": 0.0,
            "val_accuracy": val_accuracy(real_model, str(data)),
            "train_s": secs,
            "epochs": epochs,
        }
    )
    classifier = work / "classifier-real"
    save_payload(
        classifier,
        train_payload(
            model_state=real_model.state_dict(),
            model_spec=real_model.spec,
            optimizer={},
            scheduler={},
            epoch=epochs,
            config=vars(args),
            data=data_summary(meta),
            history=[],
            provenance={},
            elapsed_s=secs,
        ),
    )
    need = max(ratios)
    per_class = math.ceil(round(need / (1 - need) * n_train) / meta["num_classes"]) if need else 1
    syn = work / "synthetic"
    t0 = time.perf_counter()
    sampled = sample(
        SynthSampleConfig(
            generator=generator,
            per_class=per_class,
            out=str(syn),
            seed=args.seed,
            classifier=str(classifier),
            real=str(data),
            overwrite=True,
        )
    )
    q = sampled["quality"]
    results.update(sample={"rows": sampled["rows"], "wall_s": time.perf_counter() - t0}, quality=q)
    print(f"synthetic: {sampled['rows']} rows in {results['sample']['wall_s']:.0f} s; grid {sampled['grid']}")
    print(
        f"quality ({q['rows']} images per side, our convnet's {q['feature_dim']}-d features): "
        f"class consistency {q['class_consistency']:.3f} (the classifier on real val: "
        f"{q['classifier_real_accuracy']:.3f}), "
        f"diversity ratio {q['diversity_ratio']:.3f}, FID-style {q['fid_style']:.2f} "
        f"(real train vs val: {q.get('fid_style_real_reference', float('nan')):.2f})"
    )
    for ratio in ratios:
        if ratio == 0:
            continue
        model, secs, epochs = train_classifier(str(data), str(syn), ratio, args)
        rows.append(
            {
                "ratio": ratio,
                "val_accuracy": val_accuracy(model, str(data)),
                "train_s": secs,
                "epochs": epochs,
            }
        )
    results["runs"] = rows
    write_json(work / "results.json", results)
    print(f"\n{'synthetic':>9}  {'val acc':>7}  {'steps':>5}  {'epochs':>6}  {'train s':>7}")
    for r in rows:
        print(f"{r['ratio']:>9.0%}  {r['val_accuracy']:>7.4f}  {args.steps:>5}  {r['epochs']:>6}  {r['train_s']:>7.0f}")
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
