"""Pipeline parallelism: the model's blocks split into S stages, one per Ray Train
worker, trained with M micro-batches; W = S x D workers run D data-parallel pipelines.

Mesh and data (:mod:`effray.train.stages`): rank r is stage ``r % S`` of pipeline ``r // S``;
gradients are averaged within each stage's data-parallel group. Only a pipeline's stage-0
rank reads its shard; it sends every batch's size and labels (and mixup targets) down the
pipeline ahead of the activations, so every stage runs the same batches; an empty header
ends the epoch. Validation reads the whole split on every rank, as DDP does.

BatchNorm: statistics are per micro-batch (as in ``torch.distributed.pipelining``), and
running statistics are updated once per micro-batch, in micro-batch order. A pipeline
step therefore equals single-process *gradient accumulation* over the same M
micro-batches (loss of each scaled by its share of the batch), not one full-batch
forward. Evaluation runs the whole eval batch through the same stages in eval mode.

P2P: our own GPipe / 1F1B, not ``torch.distributed.pipelining``: labels and end-of-epoch
markers travel on the same channel. Every exchange is one ``batch_isend_irecv`` that
both ends post in the same order, waited on before it is used. NCCL does not buffer
sends, so 1F1B's steady state pairs "send this activation forward" with "receive that
gradient back" (and "send this input gradient back" with "receive the next input") in
one batched call on both ends, as Megatron-LM does; ungrouped, two neighbours sending to
each other at once would deadlock on NCCL (gloo buffers them, which hid it). Shapes are
known without per-message headers: each link's first activation carries a one-time
header (per-sample shape, dtype), gradients have the shape of the activation they answer,
labels the batch size stage 0 announces once per batch. Works on gloo (CPU) and NCCL
(tensors on the worker's GPU).

Checkpoints: every rank calls :meth:`state_dict` / :meth:`optimizer_state`; pipeline 0's
stages gather to rank 0 one ordinary full-model state dict (keys as the unsplit model,
because slicing an ``nn.Sequential`` keeps its keys) and a single-process-layout SGD
state, so `effray evaluate`, compression and resume load them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from effray.errors import EffrayError
from effray.train.stages import PIPELINE_SCHEDULES, Mesh, pipeline_data_config, stage_bounds
from effray.train.strategy import LossFn, Strategy, ingest_options

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)


class PipelineStrategy(Strategy):
    """S pipeline stages x D data-parallel replicas over the default process group."""

    name = "pipeline"

    def __init__(
        self,
        device: torch.device,
        *,
        channels_last: bool,
        compile: bool,
        amp: bool,
        stages: int = 2,
        microbatches: int = 4,
        pipeline_schedule: str = "gpipe",
        split_points: str = "",
        split_by: str = "params",
        microbatch_size: int = 32,
        **_: Any,
    ) -> None:
        # channels-last and torch.compile stay off: stages exchange plain contiguous tensors
        super().__init__(device, channels_last=False, compile=False, amp=amp)
        if pipeline_schedule not in PIPELINE_SCHEDULES:
            raise EffrayError(
                f"--pipeline-schedule must be one of {', '.join(PIPELINE_SCHEDULES)}, got {pipeline_schedule!r}"
            )
        self.stages, self.microbatches, self.schedule, self.split = (
            stages,
            microbatches,
            pipeline_schedule,
            split_points,
        )
        self.split_by, self.microbatch_size = split_by, microbatch_size
        self._announced = False  # sent this rank's activation header downstream yet?
        self._in_template: tuple[list[int], torch.dtype] | None = None  # learned from upstream's header
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.set_device(device)  # NCCL's batched P2P needs the current device set

    @classmethod
    def dataset_config(cls, cfg: Any = None, train_ds: Any = None) -> Any:
        stages = cfg.stages if cfg is not None else 2
        return pipeline_data_config()(
            stages, datasets_to_split=["train"], execution_options={"train": ingest_options(train_ds)}
        )

    # -- setup -------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        if world % self.stages or world < self.stages:
            raise EffrayError(f"--workers {world} must be a multiple of --stages {self.stages}")
        self.mesh = m = Mesh(rank, world, self.stages)
        # every rank creates every group, in the same order (new_group is collective)
        self.pipe_groups = [dist.new_group(m.pipeline_ranks(p)) for p in range(m.replicas)]
        self.dp_groups = [dist.new_group(m.dp_ranks(s)) for s in range(self.stages)]
        self.pipe_group, self.dp_group = self.pipe_groups[m.replica], self.dp_groups[m.stage]
        self.bounds = self._bounds(model)
        self.first, self.last = m.stage == 0, m.stage == self.stages - 1
        self.prev, self.next = rank - 1, rank + 1
        self.num_classes = int(model.spec["num_classes"])
        self.full_keys = list(model.state_dict().keys())
        stage = model[self.bounds[m.stage] : self.bounds[m.stage + 1]].to(self.device)
        stage.spec = dict(model.spec)
        return stage

    def _bounds(self, model: nn.Module) -> list[int]:
        """The split every rank uses. Measured times differ from rank to rank, so with
        ``split_by="time"`` rank 0 measures and broadcasts; every rank gets the same cut."""
        if self.split or self.split_by == "params":
            return stage_bounds(model, self.stages, self.split)
        got: list[Any] = [None]
        if self.mesh.rank == 0:
            # CIFAR-sized micro-batches: the shape every stage boundary will really carry
            sample = torch.randn(
                self.microbatch_size, int(model.spec.get("in_channels", 3)), 32, 32, device=self.device
            )
            got = [stage_bounds(model, self.stages, by="time", sample=sample)]
        dist.broadcast_object_list(got, src=0)
        return list(got[0])

    def data_rank(self, rank: int, world: int) -> tuple[int, int]:
        return self.mesh.replica, self.mesh.replicas

    # -- point to point ------------------------------------------------------------------
    def _p2p(self, sends: list[tuple[torch.Tensor, int]] = (), recvs: list[tuple[torch.Tensor, int]] = ()) -> None:  # type: ignore[assignment]
        """One batched exchange, posted identically by both ends and waited on (on NCCL the
        wait orders the compute stream after the transfer; the host does not block)."""
        ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def _ints(self, values: list[int]) -> torch.Tensor:
        """A small int64 message on the device; on a GPU through pinned memory, so the copy
        is asynchronous (a pageable copy would wait for the GPU)."""
        t = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda" and torch.cuda.is_available():
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _recv_ints(self, count: int, src: int) -> list[int]:
        """Receive ``count`` integers and read them on the host: only for the rare messages
        that decide shapes (one per batch, one per link per run)."""
        t = torch.empty(count, dtype=torch.int64, device=self.device)
        self._p2p(recvs=[(t, src)])
        return t.tolist()

    def _act_out(self, y: torch.Tensor) -> torch.Tensor:
        """The activation to send downstream; the first one is preceded by its header."""
        y = y.detach().contiguous()
        if not self._announced:
            header = [y.ndim - 1, _DTYPES.index(y.dtype), *y.shape[1:]]
            self._p2p(sends=[(self._ints(header + [0] * (8 - len(header))), self.next)])
            self._announced = True
        return y

    def _act_in(self, rows: int) -> torch.Tensor:
        """An empty buffer for ``rows`` rows of upstream's activation (its shape and dtype
        from the link's one-time header)."""
        if self._in_template is None:
            h = self._recv_ints(8, self.prev)
            self._in_template = (h[2 : 2 + h[0]], _DTYPES[h[1]])
        shape, dtype = self._in_template
        return torch.empty(rows, *shape, dtype=dtype, device=self.device)

    # -- training --------------------------------------------------------------------------
    def batches(self, make: Callable[[], Iterable[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        """Stage 0 reads ``make()`` and sends (size, labels, targets) down the pipeline;
        later stages yield label-only batches until the end-of-epoch header. Reading the
        size is a later stage's one host read per batch: its data loader, in effect."""
        if self.first:
            for batch in make():
                if not self.last:
                    self._send_labels(batch)
                yield batch
            if not self.last:
                self._p2p(sends=[(self._ints([0, 0, 0]), self.next)])
            return
        while True:
            n, has_target, target_dtype = self._recv_ints(3, self.prev)
            if not self.last:
                self._p2p(sends=[(self._ints([n, has_target, target_dtype]), self.next)])
            if n == 0:
                return
            batch = {"label": torch.empty(n, dtype=torch.int64, device=self.device), "image": None}
            if has_target:
                batch["target"] = torch.empty(n, self.num_classes, dtype=_DTYPES[target_dtype], device=self.device)
            tensors = [batch[k] for k in ("label", "target") if k in batch]
            self._p2p(recvs=[(t, self.prev) for t in tensors])
            if not self.last:
                self._p2p(sends=[(t, self.next) for t in tensors])
            yield batch

    def _send_labels(self, batch: dict[str, Any]) -> None:
        tensors = [batch["label"].to(self.device, torch.int64, non_blocking=True).contiguous()]
        if "target" in batch:
            tensors.append(batch["target"].to(self.device, non_blocking=True).contiguous())
        head = [
            len(batch["label"]),
            int("target" in batch),
            _DTYPES.index(tensors[-1].dtype) if "target" in batch else 0,
        ]
        self._p2p(sends=[(self._ints(head), self.next)])
        self._p2p(sends=[(t, self.next) for t in tensors])

    def forward_backward(
        self, model: nn.Module, images: torch.Tensor | None, batch: dict[str, torch.Tensor], loss_fn: LossFn
    ) -> torch.Tensor:
        """One optimizer step's worth of micro-batches through this stage (GPipe: all
        forwards then all backwards; 1F1B: S-s-1 warm-up forwards, then one forward and
        one backward at a time, then the remaining backwards), then the DP all-reduce.
        Returns the batch loss (the same on every stage), on the device."""
        n = len(batch["label"])
        m = min(self.microbatches, n)
        parts = {k: v.tensor_split(m) for k, v in batch.items() if k in ("label", "target")}
        micro = [{k: parts[k][i] for k in parts} for i in range(m)]
        rows = [len(mb["label"]) for mb in micro]  # shapes: known on the host
        inputs = self.inputs(images).tensor_split(m) if self.first else [None] * m
        ins: list[torch.Tensor | None] = [None] * m
        outs: list[torch.Tensor | None] = [None] * m
        total = torch.zeros((), device=self.device)

        def forward(i: int, x: torch.Tensor) -> torch.Tensor | None:
            """Micro-batch i's forward; returns the activation to send (None on the last stage)."""
            nonlocal total
            with self.autocast():
                y = model(x)
            ins[i] = x
            if self.last:
                outs[i] = loss_fn(y.float(), micro[i]) * (rows[i] / n)
                total = total + outs[i].detach()
                return None
            outs[i] = y
            return self._act_out(y)

        def backward(i: int, grad: torch.Tensor | None) -> torch.Tensor | None:
            """Micro-batch i's backward; returns the input gradient to send (None on stage 0)."""
            outs[i].backward() if self.last else outs[i].backward(grad)
            g = None if self.first else ins[i].grad
            ins[i] = outs[i] = None
            return g

        def take_input(i: int) -> torch.Tensor:
            if self.first:
                return inputs[i]
            x = self._act_in(rows[i])
            self._p2p(recvs=[(x, self.prev)])
            return x.requires_grad_()

        def grad_buffer(i: int) -> list[tuple[torch.Tensor, int]]:
            return [] if self.last else [(torch.empty_like(outs[i]), self.next)]

        warmup = m if self.schedule == "gpipe" else min(m, self.stages - 1 - self.mesh.stage)
        for i in range(warmup):
            y = forward(i, take_input(i))
            if y is not None:
                self._p2p(sends=[(y, self.next)])
        x = take_input(warmup) if warmup < m else None
        for k in range(m - warmup):  # steady 1F1B: forward warmup+k, backward k
            i = warmup + k
            y = forward(i, x)
            grad = grad_buffer(k)
            self._p2p(sends=[(y, self.next)] if y is not None else [], recvs=grad)
            g = backward(k, grad[0][0] if grad else None)
            if i + 1 < m:  # send this gradient back and receive the next input, together
                if self.first:
                    x = inputs[i + 1]
                else:
                    x = self._act_in(rows[i + 1])
                    self._p2p(sends=[(g, self.prev)], recvs=[(x, self.prev)])
                    x.requires_grad_()
            elif g is not None:
                self._p2p(sends=[(g, self.prev)])
        for j in range(m - warmup, m):  # the remaining backwards
            grad = grad_buffer(j)
            self._p2p(recvs=grad)
            g = backward(j, grad[0][0] if grad else None)
            if g is not None:
                self._p2p(sends=[(g, self.prev)])
        if self.stages > 1:  # the last stage's loss everywhere (the others add zero)
            dist.all_reduce(total, group=self.pipe_group)
        self._allreduce_grads(model)
        return total

    def _allreduce_grads(self, model: nn.Module) -> None:
        if self.mesh.replicas == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, group=self.dp_group)
        flat /= self.mesh.replicas
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def sum_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """Every stage of a pipeline holds the same sums: add them over the D pipelines."""
        if self.mesh.replicas > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    # -- evaluation ------------------------------------------------------------------------
    def sync_for_eval(self, model: nn.Module) -> None:
        if self.mesh.replicas > 1:
            for buf in model.buffers():
                dist.broadcast(buf.data, src=self.mesh.dp_ranks(self.mesh.stage)[0], group=self.dp_group)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The whole batch through the stages; the last stage's logits on every stage."""
        if self.first:
            x = self.inputs(images)
        else:
            x = self._act_in(len(images))
            self._p2p(recvs=[(x, self.prev)])
        with self.autocast():
            y = model(x)
        if not self.last:
            self._p2p(sends=[(self._act_out(y), self.next)])
            y = torch.zeros(len(images), self.num_classes, device=self.device)
        y = y.float().contiguous()
        if self.stages > 1:  # the last stage's logits everywhere (the others add zero)
            dist.all_reduce(y, group=self.pipe_group)
        return y

    # -- checkpoints -------------------------------------------------------------------------
    def _gather(self, obj: dict[str, Any]) -> list[dict[str, Any]] | None:
        out = [None] * self.mesh.world if self.mesh.rank == 0 else None
        dist.gather_object(obj if self.mesh.replica == 0 else {}, out, dst=0)
        return out

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective: rank 0 gets the whole model's state dict, other ranks ``{}``."""
        parts = self._gather({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if parts is None:
            return {}
        merged = {k: v for p in parts for k, v in p.items()}
        return {k: merged[k] for k in self.full_keys}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective: rank 0 gets the SGD state in the layout a single-process optimizer
        over the whole model (the same ``param_groups``) would have."""
        local = optimizer.state_dict()
        mine = _group_names(model, optimizer)
        flat = [n for names in mine for n in names]
        by_name = {
            flat[i]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in local["state"].items()
        }
        full = self._full_groups(mine)
        parts = self._gather(by_name)
        if parts is None:
            return {}
        index = {name: i for i, name in enumerate(n for names in full for n in names)}
        state = {index[k]: v for p in parts for k, v in p.items()}
        groups, start = [], 0
        for g, names in zip(local["param_groups"], full):
            groups.append({**g, "params": list(range(start, start + len(names)))})
            start += len(names)
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Collective: this stage's slice of a single-process-layout optimizer state."""
        mine = _group_names(model, optimizer)
        index = {name: i for i, name in enumerate(n for names in self._full_groups(mine) for n in names)}
        flat = [n for names in mine for n in names]
        local = {i: state["state"][index[name]] for i, name in enumerate(flat) if index[name] in state["state"]}
        groups, start = [], 0
        for g, names in zip(state["param_groups"], mine):
            groups.append({**g, "params": list(range(start, start + len(names)))})
            start += len(names)
        optimizer.load_state_dict({"state": local, "param_groups": groups})

    def _full_groups(self, mine: list[list[str]]) -> list[list[str]]:
        """Collective: the whole model's parameter names per optimizer group. The loop builds
        every stage's groups with the same rule, in module order, so the whole model's
        group k is pipeline 0's stages' group k one after another (any number of groups:
        ``--bias-lr-scale`` makes three)."""
        every: list[Any] = [None] * self.mesh.world
        dist.all_gather_object(every, mine)
        stages = [every[r] for r in self.mesh.pipeline_ranks(0)]
        return [[n for stage in stages for n in stage[k]] for k in range(len(mine))]


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of ``optimizer``'s parameters, group by group, in its own order (the order
    its ``state_dict`` numbers them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
