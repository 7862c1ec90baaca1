"""ONNX Runtime execution of a torch feature extractor: exported once, cached by identity.

Why: on this class of CPU, ONNX Runtime runs EfficientNet-Lite0 about 3-5x faster than PyTorch
eager with the same weights (fused conv+BN+ReLU6 kernels, no per-op dispatch), and int8 static
quantisation halves that again. PyTorch stays the training path; this module only serves.

The export is a cache, not a source: `<stem>.onnx` beside `<stem>.json`, whose `key` records what
the graph was made from (the weights' sha256, the input size, the opset, what the graph computes
and this module's export format). A key that differs from the one asked for means the file is
stale and is exported again; files are written to a temporary name and renamed, so a reader
never sees half a model and two processes exporting at once both end with a whole one.

int8 (`quantize_int8`): static QDQ quantisation, weights per channel (int8), activations per
tensor (uint8) with ranges from MinMax calibration on real crops. Whether the result is good
enough is not decided here: `natix_miner.toolkit.quantize` measures it on labelled data and
records the verdict in the int8 file's sidecar, which the tier checks before serving it.

Threads come from the tier's options through `SessionOptions` (intra-op threads of that session
only), so serving never changes torch's process-wide thread settings.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
from loguru import logger

# Bump when what an exported file contains changes meaning (its inputs, outputs or graph).
EXPORT_FORMAT = 1
DEFAULT_OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "features"


@dataclass(frozen=True)
class ExportKey:
    """What an exported graph was made from; any difference makes a cached file stale."""

    weights_sha256: str
    input_size: int
    opset: int
    graph: str  # what the graph computes, e.g. "efficientnet-lite0.extract_features+gap"
    format: int = EXPORT_FORMAT

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def read_record(path: Path) -> Optional[dict[str, Any]]:
    """The sidecar record of a cached model (None when either file is missing or unreadable)."""
    side = sidecar(path)
    if not Path(path).exists() or not side.exists():
        return None
    try:
        rec = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def write_record(path: Path, record: dict[str, Any]) -> None:
    _atomic_write(sidecar(path), lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n",
                                                              encoding="utf-8"))


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_torch(module: Any, path: Path, input_size: int, opset: int) -> None:
    """Export `module` ([N, 3, S, S] float32 -> [N, C]) with a dynamic batch axis (atomic write).

    The TorchScript-based exporter (`dynamo=False`) needs no extra package and handles these
    plain conv nets exactly."""
    import torch

    module = module.eval()
    x = torch.zeros(2, 3, input_size, input_size, dtype=torch.float32)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "n"}, OUTPUT_NAME: {0: "n"}})

    _atomic_write(path, write)


def cached_export(path: Path, key: ExportKey, export: Callable[[Path], None]) -> tuple[Path, bool]:
    """`path`, exported by `export(path)` unless it is there with a sidecar recording `key`.

    Returns (path, whether it was (re)built now)."""
    rec = read_record(path)
    if rec is not None and rec.get("key") == key.as_dict():
        return Path(path), False
    why = "missing" if rec is None else "stale (made from other weights or settings)"
    t0 = time.monotonic()
    export(Path(path))
    write_record(path, {"key": key.as_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "export_s": round(time.monotonic() - t0, 2)})
    logger.info("exported {} ({}) in {:.1f} s", path, why, time.monotonic() - t0)
    return Path(path), True


def make_session(path: Path, threads: int) -> Any:
    """A CPU InferenceSession with `threads` intra-op threads (0 = onnxruntime's default).

    One inter-op thread and sequential execution: the graph is a chain, and the engine already
    gives each tier its own worker thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads > 0:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxFeatures:
    """A session that maps [N, 3, S, S] float32 pixels to [N, C] features."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = Path(path)
        self.threads = threads
        self.session = make_session(self.path, threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an iterable of [N, 3, S, S] batches."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}


def quantize_int8(src: Path, dst: Path, batches: Iterable[np.ndarray]) -> None:
    """Static int8 QDQ model of `src` at `dst`, activation ranges calibrated on `batches`.

    Weights int8 per output channel, activations uint8 per tensor (MinMax over the calibration
    crops; intermediate outputs are reduced every 16 batches so memory stays flat)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="int8-") as tmpdir:
        pre = Path(tmpdir) / "pre.onnx"
        out = Path(tmpdir) / "int8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(pre))
            quantize_static(str(pre), str(out), _Reader(batches), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"CalibMaxIntermediateOutputs": 16})
        _atomic_write(dst, lambda tmp: tmp.write_bytes(out.read_bytes()))
