"""``CompressConfig``: every knob of a compression run, one frozen dataclass of plain fields;
``CompressRunConfig``: that, the data, the output and the Ray Train workers of `effray compress`.

Plain fields (no nesting, no unions) so the same definition is the ``effray compress``
flags, the Ray Tune search space (``tune.choice`` over ``bits``, ``prune_rate``, ...),
the metrics JSON's ``config`` and the artifact's ``config``. Field names are prefixed
(``prune_*``, ``kd_*``, ``finetune_*``) so they can't clash with ``DataConfig`` or
``TrainConfig`` flags when a CLI flattens them into one namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from effray.config import option, require, require_whole_gpus
from effray.data.pipeline import DataConfig
from effray.models import check_model_name
from effray.models.reference import is_reference

PRUNE_KINDS = ("unstructured", "structured")
IMPORTANCES = ("l1", "l2", "taylor")
SCHEDULES = ("oneshot", "cubic")
QUANT_MODES = ("qat", "ptq")
ACT_RANGES = ("ema", "lsq")
CODECS = ("none", "lzma")
ALLOCATIONS = ("uniform", "sensitivity")
QAT_BN = ("simulate", "fold")
OFF = 32  # bits meaning "leave this in float32"


def parse_layers(text: str, flag: str, value: type) -> dict[str, Any]:
    """``"conv1=4,fc=8"`` -> ``{"conv1": 4, "fc": 8}``: a per-layer setting as the one
    plain string a CLI flag, a Tune sample and an artifact's config all hold."""
    out: dict[str, Any] = {}
    for item in (t.strip() for t in str(text or "").split(",")):
        if not item:
            continue
        name, eq, raw = item.rpartition("=")
        try:
            parsed = value(raw)
        except ValueError:
            parsed = None
        require(
            bool(eq and name) and parsed is not None and name not in out,
            f"{flag} takes LAYER=VALUE pairs separated by commas, each layer once (e.g. features.0=4), got {item!r}",
        )
        out[name] = parsed
    return out


def format_layers(values: dict[str, Any]) -> str:
    """Inverse of :func:`parse_layers`, in the given order (rates to 4 decimals)."""
    return ",".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in values.items())


def valid_bits(bits: int) -> bool:
    """2..8 bits, or 32 (= not quantized). 1 bit would need a different (binary) quantizer."""
    return not isinstance(bits, bool) and isinstance(bits, int) and (2 <= bits <= 8 or bits == OFF)


@dataclass(frozen=True)
class CompressConfig:
    """What to compress into what, and how: any subset of pruning, quantization and KD."""

    teacher: str = option("", "checkpoint to compress (a run directory or its model.pt); also the KD teacher")
    student: str = option(
        "",
        "student model for distillation: a built-in name or a reference (torchvision:NAME, timm:NAME, "
        "pkg.module:factory, with ?k=v,...); empty = compress the teacher's own architecture",
    )
    student_width: float = option(1.0, "student channel width multiplier (with a built-in --student)")
    student_weights: str = option(
        "", "start the --student from this state dict (.pt/.pth weights-only or .safetensors); a path every node sees"
    )
    student_pretrained: bool = option(False, "start the --student from torchvision's or timm's published weights")
    prune_rate: float = option(
        0.0,
        "unstructured: fraction of conv+linear weights set to zero; structured: fraction of channels removed (0 = no "
        "pruning)",
    )
    prune_kind: str = option(
        "unstructured",
        "unstructured (zeros in the weights) or structured (channels physically removed)",
        choices=PRUNE_KINDS,
    )
    prune_importance: str = option(
        "l1", "what ranks weights/channels: l1, l2 (magnitude) or taylor (|weight x gradient|)", choices=IMPORTANCES
    )
    prune_schedule: str = option(
        "oneshot",
        "oneshot (all at once) or cubic (Zhu & Gupta 2017 gradual) over --prune-steps events",
        choices=SCHEDULES,
    )
    prune_steps: int = option(1, "pruning events, each followed by fine-tuning (cubic schedule)")
    bits: int = option(OFF, "weight bits of every conv and linear layer: 2..8, or 32 = no quantization")
    layer_bits: str = option(
        "",
        "weight bits of named layers, LAYER=BITS,... (2..8 or 32 = float), overriding --bits and the first/last "
        "layer's bits for those layers",
    )
    layer_rates: str = option(
        "",
        "prune rate of named layers, LAYER=RATE,...: each layer is then pruned on its own, the unnamed ones at "
        "--prune-rate (the classifier at 0 unless named); unstructured: its lowest-scored weights; structured: that "
        "share of its output channels (layers coupled by a residual add share their group's first named rate)",
    )
    allocation: str = option(
        "uniform",
        "uniform (one --bits and --prune-rate for all layers) or sensitivity (per-layer bits and rates chosen "
        "from --sensitivity to cost at most the uniform config's bytes; structured: per-layer channel rates at most "
        "its MACs)",
        choices=ALLOCATIONS,
    )
    sensitivity: str = option(
        "", "sensitivity.parquet (or its directory) from `effray sensitivity` on this teacher, for --allocation"
    )
    first_layer_bits: int = option(8, "bits of the first conv (weights and its input): 2..8 or 32")
    last_layer_bits: int = option(8, "bits of the classifier (weights and its input): 2..8 or 32")
    act_bits: int = option(8, "bits of every layer's input activation when quantizing: 2..8 or 32 = float activations")
    act_range: str = option(
        "ema", "activation ranges: ema (calibrated running min/max) or lsq (learned step size)", choices=ACT_RANGES
    )
    quant_mode: str = option(
        "qat", "qat (fake-quant during fine-tuning) or ptq (calibrate only, no training)", choices=QUANT_MODES
    )
    qat_bn: str = option(
        "simulate",
        "QAT's BatchNorms: simulate (kept while training, their fold simulated in the quantized weights; folded at "
        "the end) or fold (folded before QAT: the net trains without normalisation)",
        choices=QAT_BN,
    )
    calib_batches: int = option(8, "batches used to calibrate quantizer ranges")
    kd_temperature: float = option(4.0, "distillation temperature T (> 0)")
    kd_alpha: float = option(0.0, "weight of the soft (teacher) loss vs the hard labels; 0 = no distillation")
    kd_features: str = option(
        "",
        "feature distillation: modules whose outputs the student matches to the teacher's, STUDENT=TEACHER,... or "
        "names both models share (a learned 1x1 projection where widths differ)",
    )
    kd_feature_weight: float = option(1.0, "weight of the feature term (a normalised MSE, ~1 at the start)")
    finetune_epochs: int = option(1, "fine-tuning epochs after pruning / during QAT (0 = one-shot, PTQ)")
    finetune_lr: float = option(0.01, "peak fine-tuning learning rate (SGD, cosine decay)")
    finetune_batch_size: int = option(256, "fine-tuning batch size")
    codec: str = option(
        "lzma", "entropy stage over the packed weights: lzma (Deep Compression's Huffman role) or none", choices=CODECS
    )
    int8: bool = option(
        True, "also build the int8 CPU runtime (torchao PT2E, oneDNN x86 kernels) and measure its latency"
    )

    @property
    def prunes(self) -> bool:
        return self.prune_rate > 0 or any(r > 0 for r in self.rates_by_layer.values())

    @property
    def quantizes(self) -> bool:
        # activations are only quantized alongside weights: an act-only mode buys no size
        return self.bits != OFF or any(b != OFF for b in self.bits_by_layer.values())

    @property
    def bits_by_layer(self) -> dict[str, int]:
        return parse_layers(self.layer_bits, "--layer-bits", int)

    @property
    def rates_by_layer(self) -> dict[str, float]:
        return parse_layers(self.layer_rates, "--layer-rates", float)

    @property
    def per_layer_rates(self) -> bool:
        """Whether each layer is pruned on its own (``--layer-rates``) rather than globally."""
        return bool(self.rates_by_layer)

    @property
    def final_rate(self) -> float:
        """The rate a pruning schedule ramps to: ``--prune-rate``, or the highest per-layer rate."""
        return max([self.prune_rate, *self.rates_by_layer.values()])

    @property
    def feature_pairs(self) -> dict[str, str]:
        """Student module -> teacher module whose outputs ``--kd-features`` matches."""
        items = (t.strip() for t in str(self.kd_features or "").split(","))
        return parse_layers(",".join(i if "=" in i else f"{i}={i}" for i in items if i), "--kd-features", str)

    @property
    def distills(self) -> bool:
        return self.kd_alpha > 0

    def validate(self) -> None:
        require(
            isinstance(self.prune_rate, (int, float)) and 0.0 <= self.prune_rate < 1.0,
            f"--prune-rate must be in [0, 1), got {self.prune_rate}",
        )
        require(
            self.prune_kind in PRUNE_KINDS,
            f"--prune-kind must be one of {', '.join(PRUNE_KINDS)}, got {self.prune_kind!r}",
        )
        require(
            self.prune_importance in IMPORTANCES,
            f"--prune-importance must be one of {', '.join(IMPORTANCES)}, got {self.prune_importance!r}",
        )
        require(
            self.prune_schedule in SCHEDULES,
            f"--prune-schedule must be one of {', '.join(SCHEDULES)}, got {self.prune_schedule!r}",
        )
        require(
            isinstance(self.prune_steps, int) and self.prune_steps >= 1,
            f"--prune-steps must be >= 1, got {self.prune_steps}",
        )
        for flag, bits in (
            ("--bits", self.bits),
            ("--first-layer-bits", self.first_layer_bits),
            ("--last-layer-bits", self.last_layer_bits),
            ("--act-bits", self.act_bits),
        ):
            require(valid_bits(bits), f"{flag} must be 2..8 (or 32 = off), got {bits}")
        require(
            self.act_range in ACT_RANGES, f"--act-range must be one of {', '.join(ACT_RANGES)}, got {self.act_range!r}"
        )
        require(
            self.quant_mode in QUANT_MODES,
            f"--quant-mode must be one of {', '.join(QUANT_MODES)}, got {self.quant_mode!r}",
        )
        require(self.qat_bn in QAT_BN, f"--qat-bn must be one of {', '.join(QAT_BN)}, got {self.qat_bn!r}")
        require(self.calib_batches >= 1, f"--calib-batches must be >= 1, got {self.calib_batches}")
        require(self.kd_temperature > 0, f"--kd-temperature must be > 0, got {self.kd_temperature}")
        require(0.0 <= self.kd_alpha <= 1.0, f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        require(
            self.kd_feature_weight > 0 or not self.feature_pairs,
            f"--kd-feature-weight must be > 0 with --kd-features, got {self.kd_feature_weight}",
        )
        require(self.student_width > 0, f"--student-width must be > 0, got {self.student_width}")
        require(self.finetune_epochs >= 0, f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        require(self.finetune_lr > 0, f"--finetune-lr must be > 0, got {self.finetune_lr}")
        require(self.finetune_batch_size > 0, f"--finetune-batch-size must be > 0, got {self.finetune_batch_size}")
        for name, b in self.bits_by_layer.items():
            require(valid_bits(b), f"--layer-bits {name}={b}: bits must be 2..8 (or 32 = off)")
        for name, r in self.rates_by_layer.items():
            require(0.0 <= r < 1.0, f"--layer-rates {name}={r}: a rate must be in [0, 1)")
        require(
            self.allocation in ALLOCATIONS,
            f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}",
        )
        require(
            self.allocation == "uniform" or bool(self.sensitivity),
            "--allocation sensitivity needs --sensitivity PATH (the sensitivity.parquet of `effray sensitivity`)",
        )
        require(self.codec in CODECS, f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.student:
            check_model_name(self.student, "--student")
            require(
                self.student_width == 1.0 or not is_reference(self.student),
                f"--student-width applies to built-in students; give {self.student} its size through its ?k=v "
                "arguments",
            )
        require(
            bool(self.student) or not (self.student_weights or self.student_pretrained),
            "--student-weights/--student-pretrained start a --student; name one (the teacher keeps its own weights)",
        )
        require(
            not (self.student_weights and self.student_pretrained),
            "--student-weights and --student-pretrained both set the student's start; pass one",
        )


@dataclass(frozen=True)
class CompressRunConfig:
    """What to compress (``CompressConfig``), on which data, into which directory, on how
    many Ray Train workers."""

    compress: CompressConfig = CompressConfig()
    data: DataConfig = DataConfig()
    out: str = option("", "output directory: the artifact (model.pt) and metrics.json")
    overwrite: bool = option(False, "replace an existing --out")
    workers: int = option(2, "data-parallel fine-tuning workers (Ray Train workers)")
    cpus_per_worker: float = option(1.0, "logical CPUs reserved per worker (torch threads = max(1, floor(this)))")
    gpus_per_worker: float = option(0.0, "GPUs per worker; > 0 fine-tunes on GPUs with NCCL, 0 on CPUs with gloo")
    data_cpus: float = option(1.0, "logical CPUs per Ray Data decode/augment task")
    eval_batch_size: int = option(256, "batch size for validation and calibration")
    max_failures: int = option(
        2, "fine-tuning restarts after a worker or node dies, each from the last epoch's checkpoint (-1 = forever)"
    )
    inject_failure_at_epoch: int = option(
        -1,
        "for testing fault tolerance: worker rank 1 (0 if alone) dies once during this fine-tuning epoch (1-based; "
        "-1 = never)",
    )
    trust_code: bool = option(
        False,
        "import the pkg.module:factory a --teacher checkpoint names (never done on a file's say-so; a module also "
        "given as --student is trusted)",
    )

    def validate(self) -> None:
        require(bool(self.compress.teacher), "--teacher CKPT is required (a checkpoint from `effray train`)")
        require(bool(self.data.data), "--data DIR is required (a dataset from `effray data prepare`)")
        require(bool(self.out), "--out DIR is required")
        require(isinstance(self.workers, int) and self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        require(
            self.cpus_per_worker > 0 and self.gpus_per_worker >= 0 and self.data_cpus > 0,
            "--cpus-per-worker and --data-cpus must be > 0, --gpus-per-worker >= 0",
        )
        require(self.eval_batch_size > 0, f"--eval-batch-size must be > 0, got {self.eval_batch_size}")
        require(self.max_failures >= -1, f"--max-failures must be >= -1, got {self.max_failures}")
        require(
            self.inject_failure_at_epoch == -1 or 1 <= self.inject_failure_at_epoch <= self.compress.finetune_epochs,
            f"--inject-failure-at-epoch must be -1 or 1..{self.compress.finetune_epochs} (--finetune-epochs)",
        )
        require_whole_gpus(self.workers, self.gpus_per_worker)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0
