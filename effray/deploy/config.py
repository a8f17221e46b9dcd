"""The configs of ``effray export|predict|serve``: one frozen dataclass per command, its
fields the command's flags. Kept apart from the commands so that a Serve replica, a Ray
Data actor and the CLI all build from the same definition without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from effray.compress.program import vnni
from effray.config import option, require

# a --format -> the fp32 kinds it writes, in order (OpenVINO's IR is converted from the ONNX file)
FORMATS = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "openvino": ("onnx", "openvino"),
    "all": ("torch", "onnx", "openvino"),
}
KIND_HELP = (
    "which file of an export directory: torch, onnx, onnx-int8, torch-int8, openvino, openvino-int8 ('' = the first "
    "present)"
)
MODEL_HELP = "checkpoint, compressed artifact or `effray export` output"
MODEL_REQUIRED = "--model PATH is required (a checkpoint, artifact or `effray export` output)"
TRUST_HELP = (
    "import the pkg.module:factory a checkpoint or artifact names to rebuild its model (never done on a file's "
    "say-so; .pt2/ONNX exports need no model code)"
)


@dataclass(frozen=True)
class ExportConfig:
    """Which model to export, to what, checked against which data."""

    artifact: str = option("", "compressed artifact or training checkpoint (directory or model.pt)")
    format: str = option(
        "torch",
        "torch: a torch.export program (.pt2); onnx: ONNX (fp32); openvino: ONNX and OpenVINO's IR converted from it "
        "(.xml/.bin); all: the three",
        choices=tuple(FORMATS),
    )
    int8: bool = option(
        False,
        "also write the int8 model: torchao PT2E (x86) for torch, onnxruntime static QDQ for onnx (which OpenVINO "
        "converts too)",
    )
    out: str = option("", "output directory ('' = ARTIFACT_DIR/export); an earlier export there is replaced")
    data: str = option(
        "", "prepared dataset for the parity check and int8 calibration ('' = the one the artifact records)"
    )
    split: str = option("val", "split the parity check runs on")
    batch_size: int = option(256, "images per forward pass in the parity check and per calibration batch")
    calib_batches: int = option(8, "batches of the training split that calibrate int8 activations")
    min_agreement: float = option(0.999, "top-1 agreement with the source an fp32 file must reach")
    min_int8_agreement: float = option(0.995, "top-1 agreement with the source an int8 file must reach")
    int8_fallback: bool = option(
        False,
        "an int8 file that can't be written or misses its parity check is left out and the rest written "
        "(deploy.json says why), instead of nothing",
    )
    int8_reduce_range: str = option(
        "auto",
        "int8 range for CPUs without VNNI, whose kernels would overflow at full range: "
        "on = a student's 8-bit-weight layers stay float and a float model's activations get 7 bits (torch), 7-bit "
        "weights (ONNX); off = full 8 bits everywhere; "
        "auto = on unless this CPU has VNNI",
        choices=("auto", "on", "off"),
    )
    trust_code: bool = option(False, TRUST_HELP)

    def validate(self) -> None:
        require(bool(self.artifact), "--artifact PATH is required (a compressed artifact or checkpoint)")
        require(self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        require(self.batch_size > 0, f"--batch-size must be a positive integer, got {self.batch_size}")
        require(self.calib_batches > 0, f"--calib-batches must be a positive integer, got {self.calib_batches}")
        for flag, v in (("--min-agreement", self.min_agreement), ("--min-int8-agreement", self.min_int8_agreement)):
            require(0.0 <= v <= 1.0, f"{flag} must be in [0, 1], got {v}")
        require(
            self.int8_reduce_range in ("auto", "on", "off"),
            f"--int8-reduce-range must be auto, on or off, got {self.int8_reduce_range!r}",
        )

    @property
    def reduce_range(self) -> bool:
        return self.int8_reduce_range == "on" or (self.int8_reduce_range == "auto" and not vnni())

    @property
    def kinds(self) -> list[str]:
        """The files to write, in order (the fp32 ONNX file is the int8 one's input)."""
        base = FORMATS[self.format]
        return [k for b in base for k in ((b, f"{b}-int8") if self.int8 else (b,))]


@dataclass(frozen=True)
class PredictConfig:
    """Which model over which images, where the predictions go."""

    model: str = option("", MODEL_HELP)
    data: str = option(
        "",
        "a prepared dataset, any `effray data prepare` source (CIFAR folder, image folder, Parquet) or a folder of "
        "images",
    )
    out: str = option(
        "",
        "output directory: predictions.parquet, skipped.parquet (unusable images and why), predict.json; written "
        "whole or not at all",
    )
    split: str = option("val", "split to predict when --data is a prepared dataset")
    kind: str = option("", KIND_HELP)
    batch_size: int = option(256, "images per model call")
    actors: int = option(0, "model replicas in the actor pool (0 = one per GPU, else one per 2 CPUs)")
    gpus_per_actor: float = option(-1.0, "GPUs per model actor (-1 = 1 when the cluster has GPUs, else 0)")
    cpus_per_actor: float = option(1.0, "CPUs per model actor (torch runs that many threads in it)")
    top_k: int = option(5, "classes kept per row, most probable first")
    overwrite: bool = option(False, "replace an existing --out directory")
    trust_code: bool = option(False, TRUST_HELP)

    def validate(self) -> None:
        require(bool(self.model), MODEL_REQUIRED)
        require(bool(self.data), "--data is required (a prepared dataset, a prepare source or a folder of images)")
        require(bool(self.out), "--out DIR is required (predictions.parquet goes there)")
        require(self.batch_size > 0, f"--batch-size must be a positive integer, got {self.batch_size}")
        require(self.actors >= 0, f"--actors must be >= 0 (0 = auto), got {self.actors}")
        require(self.top_k > 0, f"--top-k must be a positive integer, got {self.top_k}")
        require(
            self.gpus_per_actor == -1 or self.gpus_per_actor >= 0,
            f"--gpus-per-actor must be >= 0 (or -1 = auto), got {self.gpus_per_actor}",
        )
        require(self.cpus_per_actor > 0, f"--cpus-per-actor must be positive, got {self.cpus_per_actor}")


@dataclass(frozen=True)
class ServeConfig:
    """Which model to serve, where, on what."""

    model: str = option("", MODEL_HELP)
    kind: str = option("", KIND_HELP)
    host: str = option(
        "127.0.0.1",
        "address to bind; anything but loopback is reachable by others and has no authentication of its own",
    )
    port: int = option(8000, "HTTP port")
    replicas: int = option(1, "model replicas")
    gpus_per_replica: float = option(-1.0, "GPUs per replica (-1 = 1 when the cluster has GPUs, else 0)")
    cpus_per_replica: float = option(1.0, "CPUs per replica")
    max_batch_size: int = option(32, "requests batched into one model call (@serve.batch)")
    batch_wait_timeout_s: float = option(0.01, "longest a request waits for its batch to fill")
    max_request_bytes: int = option(4 << 20, "largest request body accepted (413 beyond)")
    max_images_per_request: int = option(64, "most images in one JSON batch request (400 beyond)")
    trust_code: bool = option(False, TRUST_HELP)
    max_image_pixels: int = option(
        40_000_000,
        "largest image (width x height) a request may hold, refused from its header before decoding (413 "
        "beyond); smaller images of another size than the model takes are resized by its preprocessing",
    )

    def validate(self) -> None:
        require(bool(self.model), MODEL_REQUIRED)
        require(self.max_image_pixels > 0, f"--max-image-pixels must be positive, got {self.max_image_pixels}")
        require(1 <= self.port <= 65535, f"--port must be in 1..65535, got {self.port}")
        require(self.replicas >= 1, f"--replicas must be >= 1, got {self.replicas}")
        require(self.max_batch_size >= 1, f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        require(self.batch_wait_timeout_s >= 0, f"--batch-wait-timeout-s must be >= 0, got {self.batch_wait_timeout_s}")
        require(self.max_request_bytes > 0, f"--max-request-bytes must be positive, got {self.max_request_bytes}")
        require(
            self.max_images_per_request >= 1,
            f"--max-images-per-request must be >= 1, got {self.max_images_per_request}",
        )
        require(
            self.gpus_per_replica == -1 or self.gpus_per_replica >= 0,
            f"--gpus-per-replica must be >= 0 (or -1 = auto), got {self.gpus_per_replica}",
        )
        require(self.cpus_per_replica > 0, f"--cpus-per-replica must be positive, got {self.cpus_per_replica}")
