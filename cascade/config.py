"""The cascade's configuration: one YAML file, validated at load.

Every section is a frozen dataclass whose field docstrings (the `# ` comment above each field)
are the reference for operators. `build_dataclass` turns a YAML mapping into one of them and
raises `ConfigError` naming the file, the dotted key and what was expected, for unknown keys,
missing keys and wrong types alike. The shell's own section (`miner:`) is validated by the same
function in `natix_miner.settings`; each layer receives only its slice.

Relative paths in a config are resolved against the directory that holds the config file.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from cascade.errors import ConfigError

CALIBRATION_METHODS = ("temperature", "platt", "isotonic", "identity")
# The image conditions `cascade.conditions` estimates (named here so config keys can be checked).
CONDITION_NAMES = ("day", "night", "low_contrast", "blur", "rain", "fog", "glare", "motion_blur")

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "fp8": 1, "int8": 1, "int4": 0.5, "nvfp4": 0.5, "awq": 0.5, "gptq": 0.5}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(source, key, _type_name(tp), value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"a mapping of {tp.__name__} fields", value)
        return build_dataclass(tp, value, source=source, prefix=key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, key, f"a list ({_type_name(tp)})", value)
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"a mapping ({_type_name(tp)})", value)
        args = typing.get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(val_tp, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, "a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, "an integer", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, "true or false", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, "a string", value)
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(source, key, "a path string", value)
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(source, key, _type_name(tp), value)
    return value


def build_dataclass(cls: type, data: Optional[Mapping[str, Any]], *, source: str, prefix: str) -> Any:
    """Build dataclass `cls` from a YAML mapping, naming `source` and `prefix.key` on any error."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(source, prefix or "<root>", f"a mapping of {cls.__name__} fields", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(source, where, f"one of {sorted(fields)} (unknown key)")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], source, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(source, key, f"a value ({_type_name(hints[name])}); it is required")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(source, prefix or "<root>", str(exc)) from exc
    check = getattr(obj, "validate", None)
    if callable(check):
        check(source, prefix)
    return obj


@dataclass(frozen=True)
class TierSpec:
    """One model tier, in cost order within `tiers:`."""

    # Unique name, `family_variant.weights_tag` (e.g. `effnet_lite0.roadwork_head`).
    name: str
    # Registered backend family (see `models.registry`); an unknown name lists the known ones.
    backend: str
    # Hugging Face id or local path of the weights (relative paths: against the config file).
    checkpoint: Optional[str] = None
    # "cpu", "cuda", "cuda:0", "cuda:1"; placement may refine "cuda" to a concrete device.
    device: str = "cpu"
    # Weight dtype used for placement and loading: float32, float16, bfloat16, fp8, int8, int4.
    dtype: str = "float32"
    # Largest micro-batch the engine gives this tier.
    max_batch_size: int = 8
    # How long the batcher may hold a request to fill a batch (0 = dispatch at once).
    max_wait_ms: float = 0.0
    # Declared parameter count in millions (placement: params x dtype bytes).
    params_m: float = 0.0
    # Declared activation / KV-cache reserve in MiB for `max_batch_size` images.
    reserve_mib: float = 0.0
    # Prior consensus weight (fitted weights from calibration replace it).
    weight: float = 1.0
    # Expected model time of one batch in ms: the router's estimate until the tier has run (then
    # the median of its last measured batches, queue time excluded), and the budget a latency
    # probe needs after the tier was skipped for its measured time.
    expected_latency_ms: float = 100.0
    # Per-call timeout in ms; a slower call is dropped from the answer and counted as a failure.
    timeout_ms: Optional[float] = None
    # Whether the tier runs in the cascade (false keeps it in the file for eval only).
    enabled: bool = True
    # Map `natix-miner calibrate` fits to this tier's raw probability: temperature, platt,
    # isotonic or identity.
    calibration: str = "temperature"
    # Backend-specific options, validated by the backend's own Options dataclass.
    options: dict[str, Any] = field(default_factory=dict)
    # Set by the loader: the file this spec came from and the directory paths resolve against.
    source: str = "<memory>"
    base_dir: str = "."
    # Set by the loader from the root `artifacts_dir`: where trained heads etc. live.
    artifacts_dir: str = "."

    def validate(self, source: str, prefix: str) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(source, f"{prefix}.dtype", f"one of {sorted(DTYPE_BYTES)}", self.dtype)
        if self.calibration not in CALIBRATION_METHODS:
            raise ConfigError(source, f"{prefix}.calibration", f"one of {list(CALIBRATION_METHODS)}",
                              self.calibration)
        if self.timeout_ms is not None and self.timeout_ms <= 0:
            raise ConfigError(source, f"{prefix}.timeout_ms", "a number > 0 or null", self.timeout_ms)
        if self.max_batch_size < 1:
            raise ConfigError(source, f"{prefix}.max_batch_size", "an integer >= 1", self.max_batch_size)
        for name in ("max_wait_ms", "params_m", "reserve_mib", "weight", "expected_latency_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(source, f"{prefix}.{name}", "a number >= 0", getattr(self, name))

    def resolve(self, path: Optional[str]) -> Optional[Path]:
        """A path from this tier's config, made absolute against the config's directory."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def artifact(self, filename: str) -> Path:
        """Path of one of this tier's trained artefacts: `<artifacts_dir>/<tier name>/<filename>`."""
        return Path(self.artifacts_dir) / self.name / filename

    def checkpoint_path(self) -> Optional[str]:
        """The checkpoint as a local path if one exists there, else the hub id unchanged."""
        if self.checkpoint is None:
            return None
        local = self.resolve(self.checkpoint)
        if local is not None and local.exists():
            return str(local)
        return self.checkpoint


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with an error that names the file."""
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "<file>", "an existing YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "<file>", f"valid YAML ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "<root>", "a mapping at the top level", type(data).__name__)
    return data


@dataclass(frozen=True)
class RouterConfig:
    """When to stop the cascade early."""

    # Decision threshold on the fused, calibrated probability (before the final threshold map).
    threshold: float = 0.5
    # Stop after a tier when |p - threshold| >= margin.
    margin: float = 0.35
    # Per image condition margins (night, low_contrast, blur, rain, fog, glare, motion_blur, day)
    # overriding `margin`.
    condition_margins: dict[str, float] = field(default_factory=dict)
    # Minimum number of tiers that must answer before the router may stop.
    min_tiers: int = 1
    # Skip a tier that declares the range of what it can answer (`Tier.output_range`, e.g. the
    # OCR tier) when no answer in that range could move the fused decision across the threshold:
    # the emitted probability may differ a little, the validator's rounding of it cannot.
    skip_if_decided: bool = True

    def validate(self, source: str, prefix: str) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(source, f"{prefix}.threshold", "a number in (0, 1)", self.threshold)
        unknown = sorted(set(self.condition_margins) - set(CONDITION_NAMES))
        if unknown:
            raise ConfigError(source, f"{prefix}.condition_margins.{unknown[0]}",
                              f"one of {list(CONDITION_NAMES)} (unknown condition)")
        for key, m in {"margin": self.margin, **{f"condition_margins.{k}": v
                                                  for k, v in self.condition_margins.items()}}.items():
            if not 0.0 <= m <= 0.5:
                raise ConfigError(source, f"{prefix}.{key}", "a number in [0, 0.5]", m)


@dataclass(frozen=True)
class BreakerConfig:
    """Circuit breaker around each tier."""

    # Consecutive failures that take a tier out of rotation.
    failures_to_open: int = 3
    # Seconds out of rotation before one probe request is let through.
    cooldown_s: float = 30.0


@dataclass(frozen=True)
class StoreConfig:
    """Bounded on-disk store of uncertain inputs for labelling and retraining (`cascade.store`)."""

    # Enable the store (on by default: writes are off the request path and dropped under load).
    enabled: bool = True
    # Directory (SQLite index + image files); relative to the config file.
    dir: str = "../runs/uncertain"
    # Keep at most this many items (oldest evicted).
    max_items: int = 2000
    # Disk budget in MiB (JPEGs + records); the oldest items are evicted beyond it.
    max_mb: float = 256.0
    # Save when |p - 0.5| < band (p: the emitted answer, whose 0.5 is the decision threshold).
    band: float = 0.1
    # Save when max - min of tier probabilities exceeds this.
    disagreement: float = 0.6
    # Also save this share of the other answers (an unbiased sample, for calibration); 0 = none.
    random_fraction: float = 0.0
    # Longest side of the saved image.
    max_side: int = 512
    # Writes queued at most; an item beyond it is dropped (counted), never waited for.
    max_pending: int = 4

    def validate(self, source: str, prefix: str) -> None:
        if self.max_items < 1:
            raise ConfigError(source, f"{prefix}.max_items", "an integer >= 1", self.max_items)
        if not 0 < self.max_mb < float("inf"):
            raise ConfigError(source, f"{prefix}.max_mb", "a finite number > 0", self.max_mb)
        if not 0.0 <= self.band <= 0.5:
            raise ConfigError(source, f"{prefix}.band", "a number in [0, 0.5]", self.band)
        if not 0.0 <= self.random_fraction <= 1.0:
            raise ConfigError(source, f"{prefix}.random_fraction", "a number in [0, 1]",
                              self.random_fraction)
        if self.max_side < 32:
            raise ConfigError(source, f"{prefix}.max_side", "an integer >= 32", self.max_side)
        if self.max_pending < 0:
            raise ConfigError(source, f"{prefix}.max_pending", "an integer >= 0", self.max_pending)


@dataclass(frozen=True)
class ConditionsConfig:
    """Thresholds of the cheap image-condition estimates (see `cascade.conditions`)."""

    # Night when the mean luminance (0..1) of the downscaled grey image is below this.
    night_luminance: float = 0.25
    # Low contrast when the RMS contrast (std of grey levels, 0..1) is below this.
    low_contrast_rms: float = 0.08
    # Blur when the variance of the Laplacian (grey levels 0..255) is below this.
    blur_laplacian_var: float = 60.0
    # Longest side of the thumbnail the global statistics are computed on.
    max_side: int = 256
    # Side (px) of the native-resolution crops that streaks and blur direction are judged on.
    crop_side: int = 96
    # How many such crops (from the middle band of the image; 0 = no rain / motion-blur cues).
    crops: int = 4
    # Each scored condition is set when its score in [0, 1] reaches its threshold.
    rain_threshold: float = 0.5
    fog_threshold: float = 0.5
    glare_threshold: float = 0.5
    motion_blur_threshold: float = 0.5
    # `natix-miner calibrate` fits a condition's own threshold map and consensus weights only
    # when at least this many labelled images (of the fitting part) are in that condition ...
    calibration_min_images: int = 60
    # ... and at least this many of each label; otherwise those images use the pooled ones.
    calibration_min_per_label: int = 10

    def threshold(self, name: str) -> float:
        return float(getattr(self, f"{name}_threshold"))

    def validate(self, source: str, prefix: str) -> None:
        if self.max_side < 16:
            raise ConfigError(source, f"{prefix}.max_side", "an integer >= 16", self.max_side)
        if self.crop_side < 16:
            raise ConfigError(source, f"{prefix}.crop_side", "an integer >= 16", self.crop_side)
        if self.crops < 0:
            raise ConfigError(source, f"{prefix}.crops", "an integer >= 0", self.crops)
        for name in ("rain", "fog", "glare", "motion_blur"):
            t = self.threshold(name)
            if not 0.0 < t <= 1.0:
                raise ConfigError(source, f"{prefix}.{name}_threshold", "a number in (0, 1]", t)
        if self.calibration_min_images < 2:
            raise ConfigError(source, f"{prefix}.calibration_min_images", "an integer >= 2",
                              self.calibration_min_images)
        if self.calibration_min_per_label < 1:
            raise ConfigError(source, f"{prefix}.calibration_min_per_label", "an integer >= 1",
                              self.calibration_min_per_label)


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling, deadline and failure handling."""

    # Every request is answered within this many ms of arrival (validators wait 9000 ms).
    deadline_ms: float = 6000.0
    # Answer when no tier could answer in time (never -1, never NaN).
    fallback_probability: float = 0.5
    # Path of the calibration file written by `natix-miner calibrate` (relative to the config).
    calibration: Optional[str] = None
    # Obsolete (ignored, with a warning): every tier has its own worker thread, so one slow or
    # hung tier never delays another on the same device.
    threads_per_device: int = 1
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    conditions: ConditionsConfig = field(default_factory=ConditionsConfig)

    def validate(self, source: str, prefix: str) -> None:
        if not 0.0 <= self.fallback_probability <= 1.0:
            raise ConfigError(source, f"{prefix}.fallback_probability", "a number in [0, 1]",
                              self.fallback_probability)
        if not 0 < self.deadline_ms < float("inf"):  # NaN or inf would void the deadline guarantee
            raise ConfigError(source, f"{prefix}.deadline_ms", "a finite number > 0", self.deadline_ms)
        if self.threads_per_device < 1:
            raise ConfigError(source, f"{prefix}.threads_per_device", "an integer >= 1",
                              self.threads_per_device)


@dataclass(frozen=True)
class DeviceSpec:
    """Memory available on one device, for placement."""

    # Total memory in GiB (the planner subtracts the CUDA context overhead itself).
    memory_gib: float
    # Memory the runtime takes before any model loads (null: 0.5 GiB on cuda, 0 on cpu).
    context_overhead_gib: Optional[float] = None

    def validate(self, source: str, prefix: str) -> None:
        if self.memory_gib <= 0:
            raise ConfigError(source, f"{prefix}.memory_gib", "a number > 0", self.memory_gib)
        if self.context_overhead_gib is not None and self.context_overhead_gib < 0:
            raise ConfigError(source, f"{prefix}.context_overhead_gib", "a number >= 0",
                              self.context_overhead_gib)


@dataclass(frozen=True)
class CascadeConfig:
    """The engine's slice of the root config."""

    engine: EngineConfig
    router: RouterConfig
    tiers: list[TierSpec]
    devices: dict[str, DeviceSpec]
    source: str = "<memory>"
    base_dir: str = "."
    # Where trained heads and calibration live (root key `artifacts_dir`, relative to the config).
    artifacts_dir: str = "."

    def resolve(self, path: Optional[str]) -> Optional[Path]:
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    @property
    def active_tiers(self) -> list[TierSpec]:
        return [t for t in self.tiers if t.enabled]


def without_store(cfg: CascadeConfig) -> CascadeConfig:
    """The same config with the uncertain-case store off: for offline runs on labelled data
    (`eval`, `calibrate`, `local`), whose images must not enter the store and, through an export,
    the training data."""
    store = dataclasses.replace(cfg.engine.store, enabled=False)
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, store=store))


CASCADE_KEYS = ("engine", "router", "tiers", "devices", "artifacts_dir")
# Every key a root config may hold: the cascade's, plus the shell's `miner:` section (validated by
# `natix_miner.settings`). Anything else is a typo (`engin:`, `artifact_dir:`) that would otherwise
# leave a whole section on its defaults without a word.
ROOT_KEYS = CASCADE_KEYS + ("miner",)
DEFAULT_ARTIFACTS_DIR = "../models/artifacts"


def check_root_keys(data: Mapping[str, Any], *, source: str) -> None:
    """Refuse an unknown top-level key, naming it and the known ones."""
    unknown = sorted(set(map(str, data)) - set(ROOT_KEYS))
    if unknown:
        raise ConfigError(source, unknown[0], f"one of {sorted(ROOT_KEYS)} (unknown top-level key)")


def parse_cascade_config(data: Mapping[str, Any], *, source: str, base_dir: str) -> CascadeConfig:
    """Validate the cascade slice (`engine`, `router`, `tiers`, `devices`) of a root config."""
    check_root_keys(data, source=source)
    raw_art = data.get("artifacts_dir", DEFAULT_ARTIFACTS_DIR)
    if not isinstance(raw_art, str):
        raise ConfigError(source, "artifacts_dir", "a path string", raw_art)
    art = Path(raw_art).expanduser()
    artifacts_dir = str(art if art.is_absolute() else (Path(base_dir) / art).resolve())
    engine = build_dataclass(EngineConfig, data.get("engine"), source=source, prefix="engine")
    router = build_dataclass(RouterConfig, data.get("router"), source=source, prefix="router")
    raw_tiers = data.get("tiers")
    if not isinstance(raw_tiers, list) or not raw_tiers:
        raise ConfigError(source, "tiers", "a non-empty list of tier mappings", raw_tiers)
    tiers: list[TierSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_tiers):
        if not isinstance(raw, Mapping):
            raise ConfigError(source, f"tiers[{i}]", "a mapping", raw)
        if {"source", "base_dir", "artifacts_dir"} & set(raw):
            raise ConfigError(source, f"tiers[{i}]",
                              "no 'source'/'base_dir'/'artifacts_dir' keys (set by the loader)")
        spec = build_dataclass(TierSpec, {**raw, "source": source, "base_dir": base_dir,
                                          "artifacts_dir": artifacts_dir},
                               source=source, prefix=f"tiers[{i}]")
        if spec.name in seen:
            raise ConfigError(source, f"tiers[{i}].name", "a name used by no other tier", spec.name)
        seen.add(spec.name)
        tiers.append(spec)
    raw_devices = data.get("devices") or {"cpu": {"memory_gib": 16.0}}
    if not isinstance(raw_devices, Mapping):
        raise ConfigError(source, "devices", "a mapping of device name to {memory_gib}", raw_devices)
    devices = {str(k): build_dataclass(DeviceSpec, v, source=source, prefix=f"devices.{k}")
               for k, v in raw_devices.items()}
    return CascadeConfig(engine=engine, router=router, tiers=tiers, devices=devices,
                         source=source, base_dir=base_dir, artifacts_dir=artifacts_dir)


def load_cascade_config(path: Path) -> CascadeConfig:
    """Load only the cascade slice of a root config file (ignores the `miner:` section)."""
    path = Path(path)
    data = read_yaml(path)
    return parse_cascade_config(data, source=str(path), base_dir=str(path.resolve().parent))
