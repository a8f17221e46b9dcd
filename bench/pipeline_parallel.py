"""Pipeline parallelism figures: per-worker parameter + optimizer memory for S = 1, 2, 4
(target ~1/S), and GPipe's measured bubble fraction against (S-1)/(M+S-1).

    .venv/bin/python bench/pipeline_parallel.py [--model resnet18] [--stages 2] [--microbatches 1,2,4,8]

Memory is counted from the real split (the PipelineStrategy's balanced stage bounds):
fp32 parameters + gradients + SGD momentum per stage; the busiest stage is the per-worker
figure. The bubble is measured by running the real strategy over gloo on localhost (S
processes, one thread each) on a balanced stack of equal blocks: bubble = 1 - (the
stage's compute time for M micro-batches, measured alone) / (pipelined step time).
On a shared 2-core machine keep S <= 2; larger S oversubscribes and inflates the bubble.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import time

import torch
import torch.multiprocessing as mp
from torch import nn

from effray.models import build_model
from effray.train.pipeline import PipelineStrategy
from effray.train.stages import stage_bounds

WIDTH, BATCH, BLOCKS_PER_STAGE, STEPS = 512, 256, 4, 8


def memory_table(model_name: str) -> None:
    model = build_model(model_name, 10)
    total = sum(p.numel() for p in model.parameters()) * 4 * 3  # param + grad + momentum, fp32
    print(f"\n{model_name}: parameter + gradient + SGD-momentum memory per worker (fp32)")
    print(f"{'S':>3} {'bounds':<22} {'busiest stage MiB':>18} {'x of S=1':>9} {'1/S':>6}")
    for s in (1, 2, 4):
        b = stage_bounds(model, s) if s > 1 else [0, len(model)]
        per = [sum(p.numel() for p in model[i:j].parameters()) * 4 * 3 for i, j in zip(b, b[1:])]
        print(f"{s:>3} {str(b):<22} {max(per) / 2**20:>18.1f} {max(per) / total:>9.2f} {1 / s:>6.2f}")


def _stack(stages: int) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(stages * BLOCKS_PER_STAGE)]
    )
    model.spec = {"num_classes": WIDTH}
    return model


def _loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, batch["label"])


def _worker(rank: int, world: int, port: int, micro: int, q) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    strategy = PipelineStrategy(
        torch.device("cpu"),
        channels_last=False,
        compile=False,
        amp=False,
        stages=world,
        microbatches=micro,
        pipeline_schedule="gpipe",
    )
    model = strategy.prepare(_stack(world))
    x, y = torch.randn(BATCH, WIDTH), torch.randint(0, WIDTH, (BATCH,))
    batch = {"image": x, "label": y}

    def step() -> None:
        for b in strategy.batches(lambda: [batch]):
            strategy.forward_backward(model, b["image"], b, _loss)
            model.zero_grad(set_to_none=True)

    step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        step()
    wall = (time.perf_counter() - t0) / STEPS
    dist.barrier()
    # this stage's compute alone: the same micro-batches, no neighbours to wait for
    xs = [torch.randn(BATCH // micro, WIDTH) for _ in range(micro)]
    for _warm_then_time in range(2):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            outs = [model(xi.requires_grad_()) for xi in xs]
            for o in outs:
                o.backward(torch.ones_like(o)) if not strategy.last else _loss(o, {"label": y[: len(o)]}).backward()
            model.zero_grad(set_to_none=True)
        busy = (time.perf_counter() - t0) / STEPS
    buf = io.BytesIO()
    torch.save({"rank": rank, "wall": wall, "busy": busy}, buf)
    q.put(buf.getvalue())
    dist.barrier()
    dist.destroy_process_group()


def bubble(stages: int, micro: int) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, stages, port, micro, q)) for r in range(stages)]
    for p in procs:
        p.start()
    got = [torch.load(io.BytesIO(q.get(timeout=600)), weights_only=True) for _ in procs]
    for p in procs:
        p.join()
    wall = max(g["wall"] for g in got)
    return wall, 1 - sum(g["busy"] for g in got) / len(got) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", default="2,4,8")
    args = ap.parse_args()
    memory_table(args.model)
    s = args.stages
    print(
        f"\nGPipe bubble, S={s}, {s * BLOCKS_PER_STAGE} x Linear({WIDTH}) blocks, batch {BATCH}, gloo, 1 thread/stage"
    )
    print(f"{'M':>3} {'step ms':>9} {'img/s':>8} {'measured bubble':>16} {'(S-1)/(M+S-1)':>14}")
    for m in (int(v) for v in args.microbatches.split(",")):
        wall, measured = bubble(s, m)
        print(f"{m:>3} {wall * 1e3:>9.1f} {BATCH / wall:>8.0f} {measured:>16.2f} {(s - 1) / (m + s - 1):>14.2f}")


if __name__ == "__main__":
    main()
