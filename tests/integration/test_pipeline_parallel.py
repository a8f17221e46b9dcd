"""Pipeline parallelism (issue 4): exactness against single-process training, the S x D
mesh on local Ray, checkpoints that load as ordinary models, and one-line bad requests.

The exactness checks run the real PipelineStrategy in ``torch.multiprocessing`` workers
over gloo on localhost (no Ray Train: seconds, not a fit). One Ray Train fit (S=2 x D=2
on 4 workers, CPUs oversubscribed with fractional cpus-per-worker) plus its resume.
"""

from __future__ import annotations

import io
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from effray.errors import EffrayError
from effray.models import build_model
from effray.train.stages import balanced_split, stage_bounds
from effray.train.step import param_groups

MODEL, CLASSES, BATCH, STEPS, LR = "convnet", 10, 16, 3, 0.05


def _data(step: int, replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch every training step (so the loss must fall); step 99 is held out."""
    g = torch.Generator().manual_seed(1000 * (step == 99) + replica)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def _loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, batch["label"])


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # three groups (--bias-lr-scale): decayed weights, other 1-D parameters, norm layers; the
    # classifier's bias sits between BatchNorms in module order, so a layout that assumed
    # two groups would put momentum buffers under the wrong names
    return torch.optim.SGD(param_groups(model, 5e-4, LR, bias_lr_scale=4.0), lr=LR, momentum=0.9, nesterov=True)


def _reference(stages_world: tuple[int, int], microbatches: int) -> dict:
    """Single process, same init, same batches: gradient accumulation over the same
    micro-batches (the documented BatchNorm semantics), averaged over the D replicas."""
    stages, world = stages_world
    replicas = world // stages
    torch.manual_seed(0)
    model = build_model(MODEL, CLASSES)
    opt = _optimizer(model)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for r in range(replicas):
            x, y = _data(step, r)
            for xi, yi in zip(x.tensor_split(microbatches), y.tensor_split(microbatches)):
                loss = _loss(model(xi), {"label": yi}) * (len(yi) / BATCH) / replicas
                loss.backward()
                total += float(loss.detach())
        opt.step()
        losses.append(total)
    model.eval()
    x, _ = _data(99, 0)
    with torch.no_grad():
        out = model(x)
    return {"losses": losses, "state": model.state_dict(), "opt": opt.state_dict(), "out": out}


def _worker(rank: int, world: int, port: int, stages: int, microbatches: int, schedule: str, split_by: str, q) -> None:
    import torch.distributed as dist

    from effray.train.pipeline import PipelineStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        strategy = PipelineStrategy(
            torch.device("cpu"),
            channels_last=False,
            compile=False,
            amp=False,
            stages=stages,
            microbatches=microbatches,
            pipeline_schedule=schedule,
            split_by=split_by,
            microbatch_size=BATCH // microbatches,
        )
        model = strategy.prepare(build_model(MODEL, CLASSES))
        opt = _optimizer(model)
        losses = []
        for step in range(STEPS):
            x, y = _data(step, strategy.mesh.replica)
            feed = [{"image": x, "label": y}]
            for batch in strategy.batches(lambda: feed):  # noqa: B023
                opt.zero_grad()
                loss = strategy.forward_backward(model, batch["image"], batch, _loss)
                opt.step()
                losses.append(float(strategy.sum_replicas(loss.detach().clone())) / strategy.mesh.replicas)
        model.eval()
        strategy.sync_for_eval(model)
        x, _ = _data(99, 0)
        out = strategy.predict(model, x)
        state, opt_state = strategy.state_dict(model), strategy.optimizer_state(model, opt)
        if rank == 0:  # as bytes: shared-memory tensors die with this process
            q.put(_bytes({"losses": losses, "state": state, "opt": opt_state, "out": out, "bounds": strategy.bounds}))
        if rank == world - 1:
            q.put(_bytes({"last_out": out, "bounds": strategy.bounds}))
    finally:
        dist.destroy_process_group()


def _bytes(obj: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _run(world: int, stages: int, microbatches: int, schedule: str, split_by: str) -> tuple[dict, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, stages, microbatches, schedule, split_by, q))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got = [torch.load(io.BytesIO(q.get(timeout=240)), weights_only=True) for _ in range(2)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    first = next(g for g in got if "losses" in g)
    last = next(g for g in got if "last_out" in g)
    return first, last


@pytest.mark.without_ray  # torch.multiprocessing + gloo, no Ray: runs beside the Ray group
@pytest.mark.parametrize(
    "world, stages, microbatches, schedule, split_by",
    [
        (2, 2, 4, "gpipe", "params"),
        (2, 2, 2, "1f1b", "time"),  # rank 0 measures the split and broadcasts it: every rank cuts alike
        pytest.param(
            4, 2, 2, "1f1b", "params", marks=pytest.mark.slow
        ),  # S=2 x D=2: grads averaged per stage's DP group
    ],
)
def test_pipeline_matches_single_process(world, stages, microbatches, schedule, split_by):
    got, last = _run(world, stages, microbatches, schedule, split_by)
    assert (
        got["bounds"] == last["bounds"]
        and got["bounds"][0] == 0
        and got["bounds"][-1] == len(build_model(MODEL, CLASSES))
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, the same summation order
    try:
        ref = _reference((stages, world), microbatches)
    finally:
        torch.set_num_threads(threads)
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert ref["losses"][-1] < ref["losses"][0]
    # the gathered state dict is the whole model, keyed as the unsplit one
    assert list(got["state"]) == list(ref["state"])
    model = build_model(MODEL, CLASSES)
    params = {k for k, _ in model.named_parameters()}
    # with D > 1 BatchNorm running stats are replica 0's (each replica saw its own batches)
    for k in params if world > stages else ref["state"]:
        torch.testing.assert_close(got["state"][k], ref["state"][k], rtol=1e-5, atol=1e-6)
    # ... and loads into an ordinary model whose outputs equal the pipeline's and the reference's
    model.load_state_dict(got["state"])
    with torch.no_grad():
        out = model.eval()(_data(99, 0)[0])
    torch.testing.assert_close(got["out"], out, rtol=1e-5, atol=1e-6)
    if world == stages:
        torch.testing.assert_close(out, ref["out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last["last_out"], got["out"])
    # the optimizer state is in single-process layout, so a resume continues exactly
    assert [g["params"] for g in got["opt"]["param_groups"]] == [g["params"] for g in ref["opt"]["param_groups"]]
    assert [g["lr"] for g in got["opt"]["param_groups"]] == [g["lr"] for g in ref["opt"]["param_groups"]]
    assert len(ref["opt"]["param_groups"]) == 3
    for i, s in ref["opt"]["state"].items():
        torch.testing.assert_close(
            got["opt"]["state"][i]["momentum_buffer"], s["momentum_buffer"], rtol=1e-4, atol=1e-6
        )


class _Burn(torch.nn.Module):
    """Slow but parameter-free: splitting by parameter count can't see its cost."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.eye(64) + 0.01 * torch.randn(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(1500):  # well above the three linear blocks even on a loaded 2-core machine
            x = torch.tanh(x @ self.w)
        return x


@pytest.mark.without_ray  # pure torch, no Ray: runs beside the Ray group
def test_split_by_measured_time_sees_cost_that_parameter_counts_miss():
    from effray.train.stages import block_costs

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)) for _ in range(3)], _Burn()
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = torch.randn(32, 64)
    assert stage_bounds(model, 2) == [0, 2, 4]  # by parameters: the free block looks free
    costs = block_costs(model, "time", sample)
    assert costs[3] > sum(costs[:3])
    assert stage_bounds(model, 2, by="time", sample=sample) == [0, 3, 4]  # by time: it gets a stage
    # measured on copies: BatchNorm statistics and weights are exactly as before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(EffrayError, match="sample batch"):
        block_costs(model, "time")


@pytest.mark.without_ray  # pure torch, no Ray: runs beside the Ray group
def test_split_is_balanced_and_explicit_points_are_checked():
    assert balanced_split([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balanced_split([10, 1, 1, 1, 1], 2) == [0, 1, 5]
    for name in ("convnet", "fastnet", "resnet20", "resnet18"):
        m = build_model(name, 10)
        for s in (2, 3):
            b = stage_bounds(m, s)
            assert b[0] == 0 and b[-1] == len(m) and all(x < y for x, y in zip(b, b[1:]))
    assert stage_bounds(build_model("resnet20", 10), 3, "2,5") == [0, 2, 5, len(build_model("resnet20", 10))]
    with pytest.raises(EffrayError, match="increasing block indices"):
        stage_bounds(build_model("convnet", 10), 2, "0")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stages", "4", "--workers", "4", "--microbatches", "4"], "more than model convnet's 3 blocks"),
        (["--stages", "2", "--microbatches", "1"], "--microbatches 1 must be >= --stages 2"),
        (["--workers", "3", "--batch-size", "48"], "--workers 3 must be a multiple of --stages 2"),
        (["--stages", "1"], "--stages must be >= 2"),
        (["--split-points", "1,2"], "--split-points 1,2 must be 1 increasing block indices"),
    ],
)
def test_bad_pipeline_requests_are_one_line(capsys, tiny_cifar, tmp_path, extra, message):
    from effray.cli import main

    storage = tmp_path / "runs"
    rc = main(
        [
            "train",
            "--data",
            str(tiny_cifar),
            "--model",
            "convnet",
            "--parallel",
            "pipeline",
            "--workers",
            "2",
            "--batch-size",
            "32",
            "--epochs",
            "1",
            "--no-wandb",
            "--storage",
            str(storage),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("effray: error: ") and "\n" not in err, err
    assert message in err
    assert not storage.exists()


@pytest.mark.slow
def test_pipeline_x_data_parallel_fit_on_ray_trains_checkpoints_and_restarts(ray_session, tiny_cifar, tmp_path, capsys):
    from effray.cli import main
    from effray.train.checkpoint import load_checkpoint
    from effray.train.faults import FAILURE_MARKER

    args = [
        "train",
        "--data",
        str(tiny_cifar),
        "--model",
        "convnet",
        "--parallel",
        "pipeline",
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--pipeline-schedule",
        "1f1b",
        "--workers",
        "4",
        "--cpus-per-worker",
        "0.25",
        "--data-cpus",
        "0.5",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--augment",
        "none",
        "--no-wandb",
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "pp",
        "--split-by",
        "time",
    ]
    # worker rank 1 (stage 1 of pipeline 0) dies in epoch 2: the whole group restarts from epoch 1
    assert main([*args, "--epochs", "2", "--max-failures", "1", "--inject-failure-at-epoch", "2"]) == 0, (
        capsys.readouterr().err
    )
    first = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert first["epoch"] == 2 and first["val_count"] == 60
    assert (tmp_path / "runs" / "pp" / FAILURE_MARKER).is_file()
    rows = [json.loads(ln) for ln in (tmp_path / "runs" / "pp" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # no epoch ran twice past the checkpoint
    attempts = list(dict.fromkeys(r["attempt"] for r in rows))
    assert len(attempts) == 2 and rows[1]["resumed_from"] == 1  # the stages' own states restored
    # (a run restored by re-running its command goes the same way: test_train has it for DDP)
    # the checkpoint is an ordinary whole-model checkpoint
    model, payload = load_checkpoint(first["checkpoint"])
    assert payload["model_spec"]["name"] == "convnet" and payload["epoch"] == 2
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
