"""The one interface between the engine and a model backend.

A backend owns its library (torch, transformers, onnxruntime, ...); the engine owns scheduling.
The contract follows a worker lifecycle: `load(device)` once, `warmup()` before the tier counts as
ready, `predict(images)` many times, `close()` at shutdown. `bind_worker`, `load`, `warmup` and
every `predict` run on the tier's own worker thread (one per tier, never shared with another
tier). `predict` returns one entry per input image, in order; an item that failed is an
`Exception` in its slot so one bad image never costs the rest of the batch.

Optional capabilities are declared, not assumed: `load_alone` (the engine loads the tier before
every other one, with nothing else loading beside it) and `memory_needs()` (what the backend
knows about its device memory, which the placement planner books instead of the YAML figures).
"""

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

from PIL import Image

from cascade.config import TierSpec, build_dataclass


@dataclass(frozen=True)
class TierOutput:
    """A tier's uncalibrated probability that the image shows roadwork, with what it saw."""

    prob: float
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryNeeds:
    """What a backend knows about the device memory its tier takes; placement books it.

    Every field is optional: what is None falls back to the tier's YAML (`params_m` x dtype bytes
    + `reserve_mib`)."""

    # Exact parameter count (e.g. counted from the checkpoint's config on disk).
    params: Optional[int] = None
    # Exact bytes of the weights at the tier's dtype (None: params x dtype bytes).
    weights_bytes: Optional[int] = None
    # Where `params` / `weights_bytes` came from, shown by `natix-miner plan`.
    source: Optional[str] = None
    # The runtime takes this fraction of the whole device (vLLM's gpu_memory_utilization),
    # whatever the weights; None: weights + reserve_mib.
    device_fraction: Optional[float] = None


@dataclass(frozen=True)
class NoOptions:
    """Options of a backend that takes none."""


class Tier(abc.ABC):
    """Base class of every backend.

    Subclasses set `Options` to a frozen dataclass of their backend-specific settings (defaults
    beside the code, YAML overrides under the tier's `options:` key; unknown keys are a
    ConfigError naming the tier).
    """

    Options: ClassVar[type] = NoOptions
    # Load before every other tier, with no other tier loading at the same time: for a backend
    # that changes process state while it loads or needs its device's memory free when it
    # starts (vLLM checks free memory >= gpu_memory_utilization x total at start-up).
    load_alone: ClassVar[bool] = False

    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self.options = build_dataclass(self.Options, spec.options, source=spec.source,
                                       prefix=f"tiers.{spec.name}.options")
        self.device = spec.device

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    def load(self, device: str) -> None:
        """Load weights onto `device` ("cpu", "cuda:0", ...). Called once, off the event loop."""

    def bind_worker(self, device: str) -> None:
        """Called once on the tier's own worker thread before `load` (e.g. to give that thread
        its own CUDA stream, so this tier's kernels do not queue behind another tier's)."""

    def warmup(self) -> Optional[list["TierOutput | Exception"]]:
        """Run one small batch so first-request latency is not paid by a validator; return its
        outputs, which the engine checks are finite probabilities in [0, 1] (a backend that
        returns None gets one checked `predict` from the engine instead)."""
        image = Image.new("RGB", (640, 480), (90, 90, 90))
        outputs = self.predict([image] * min(2, self.spec.max_batch_size))
        for out in outputs:
            if isinstance(out, Exception):
                raise out
        return outputs

    def output_range(self) -> Optional[tuple[float, float]]:
        """(lowest, highest) probability this tier can return, where the backend knows a range
        narrower than [0, 1]; the engine skips the tier when no answer in it could change the
        decision (`router.skip_if_decided`). None: anything in [0, 1]."""
        return None

    def memory_needs(self) -> MemoryNeeds:
        """What this backend knows about its memory beyond the YAML (called before `load`, so
        it must not touch the device); the default knows nothing more."""
        return MemoryNeeds()

    @abc.abstractmethod
    def predict(self, images: Sequence[Image.Image]) -> list["TierOutput | Exception"]:
        """Score a batch of RGB images; one entry per image, in order."""

    def close(self) -> None:
        """Release device memory and handles."""

    def describe(self) -> dict[str, Any]:
        """What `health()` reports about this tier beyond the engine's own counters."""
        return {"backend": self.spec.backend, "device": self.device,
                "options": dataclasses.asdict(self.options)}


class TrainableTier(Tier):
    """A tier whose decision head is fitted by `natix-miner train` on frozen features.

    `embed` must be deterministic for a given image so features can be cached; `head_path`
    says where `load` looks for the fitted head and where training writes it.
    """

    @abc.abstractmethod
    def embed(self, images: Sequence[Image.Image]) -> "Any":
        """Return an [N, D] float array of the features the head consumes."""

    @abc.abstractmethod
    def head_path(self) -> "Any":
        """Path of the head file this tier loads (a `pathlib.Path`)."""

    # Training hooks the `natix-miner train` shell calls; `models.heads.HeadMixin` implements
    # the last three for every backbone+head backend, so the shell never sees how a head works.

    @abc.abstractmethod
    def load_backbone(self, device: str) -> None:
        """Load only what `embed` needs (no trained head), for training."""

    def load_for_features(self, device: str) -> None:
        """Load what `embed` needs to extract head-training features, run the way serving runs
        them; the default is `load_backbone`. A backend whose serving runtime differs from its
        training framework (ONNX Runtime for EfficientNet-Lite) starts that runtime here, so a
        head is fitted on the features it will be served, at serving speed."""
        self.load_backbone(device)

    @abc.abstractmethod
    def fit_head(self, features: "Any", labels: Sequence[int], *, groups: "Any" = None,
                 seed: int = 0) -> dict[str, Any]:
        """Fit the head on [N, D] features (rows sharing a group are one image); keep it in memory."""

    @abc.abstractmethod
    def head_probs(self, features: "Any") -> "Any":
        """P(roadwork) [N] from the in-memory head for precomputed features."""

    @abc.abstractmethod
    def save_head(self, metadata: dict[str, Any]) -> "Any":
        """Write the in-memory head to `head_path()` with `metadata`; return the path."""
