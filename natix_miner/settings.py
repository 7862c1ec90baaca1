"""The shell's slice of the root config: the `miner:` section, validated like the cascade's.

Every field has its operator-facing explanation in the comment above it. `load_settings(path)`
reads one YAML file once and returns both slices, `(MinerSettings, CascadeConfig)`, so the
neuron never re-reads or re-interprets the cascade's keys. Errors are `ConfigError`s naming the
file, the dotted key (`miner.guard.min_stake`) and what was expected.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cascade.config import CascadeConfig, build_dataclass, parse_cascade_config, read_yaml
from cascade.errors import ConfigError

# SN72 on mainnet (`finney`); testnet is 323. bittensor's own default (1) is never used.
DEFAULT_NETUID = 72
# Validators query with timeout=9 s and never retry.
VALIDATOR_TIMEOUT_S = 9.0
# `miner.request_log`: a line per answered request, a periodic summary, or nothing.
REQUEST_LOG_MODES = ("line", "summary", "off")


@dataclass(frozen=True)
class DecodeSettings:
    """Caps that keep one hostile image from costing memory or time (checked before decoding)."""

    # Longest accepted base64 string, in characters (about 4/3 of the JPEG size).
    max_base64_chars: int = 16_000_000
    # Longest accepted decoded file, in bytes.
    max_bytes: int = 12_000_000
    # Most pixels (width x height) an image may declare; checked from the header before decoding.
    max_pixels: int = 40_000_000
    # Accepted container formats, as Pillow names them.
    formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])

    def validate(self, source: str, prefix: str) -> None:
        for name in ("max_base64_chars", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(source, f"{prefix}.{name}", "an integer >= 1", getattr(self, name))
        known = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}
        for i, fmt in enumerate(self.formats):
            if fmt not in known:
                raise ConfigError(source, f"{prefix}.formats[{i}]", f"one of {sorted(known)}", fmt)
        if not self.formats:
            raise ConfigError(source, f"{prefix}.formats", "a non-empty list of formats", self.formats)


@dataclass(frozen=True)
class GuardSettings:
    """Who may query the miner; every check runs before the request body is deserialised."""

    # Verify the dendrite's sr25519 signature ourselves; an empty or forged one is refused
    # (bittensor's own check has skipped empty signatures: bittensor issue 3392).
    verify_signature: bool = True
    # Refuse callers without a validator permit on the subnet.
    require_validator_permit: bool = True
    # Refuse callers whose stake (alpha, as the metagraph's S) is below this.
    min_stake: float = 0.0
    # Requests one hotkey may make per rolling minute; 0 turns the limit off. Validators send
    # about one challenge a minute, so the default leaves a wide margin.
    rate_limit_per_minute: int = 120
    # Hotkeys (ss58) admitted without being on the metagraph: the only callers in `--local` mode.
    allow_hotkeys: list[str] = field(default_factory=list)
    # Hotkeys (ss58) always refused.
    deny_hotkeys: list[str] = field(default_factory=list)

    def validate(self, source: str, prefix: str) -> None:
        if self.min_stake < 0:
            raise ConfigError(source, f"{prefix}.min_stake", "a number >= 0", self.min_stake)
        if self.rate_limit_per_minute < 0:
            raise ConfigError(source, f"{prefix}.rate_limit_per_minute", "an integer >= 0 (0 = off)",
                              self.rate_limit_per_minute)
        for key in ("allow_hotkeys", "deny_hotkeys"):
            for i, hk in enumerate(getattr(self, key)):
                if not _looks_like_ss58(hk):
                    raise ConfigError(source, f"{prefix}.{key}[{i}]", "an ss58 address", hk)


@dataclass(frozen=True)
class MinerSettings:
    """The `miner:` section: chain, guard, decode and answer policy of the neuron."""

    # Subnet uid: 72 on mainnet (finney), 323 on testnet. `--netuid` overrides it.
    netuid: int = DEFAULT_NETUID
    # Seconds between metagraph re-syncs (in a background thread; the guard reads a snapshot).
    metagraph_resync_s: float = 600.0
    # Port of a Prometheus /metrics endpoint; null = no telemetry server.
    telemetry_port: Optional[int] = None
    # What the log says about traffic at the default level: `line` = one line per answered
    # request (caller, prediction, outcome, latency); `summary` = one line every `log_summary_s`
    # (answers by outcome, latency p50/p99, callers, refusals by reason); `off` = neither.
    request_log: str = "line"
    # Seconds between two `summary` lines.
    log_summary_s: float = 60.0
    # Threads that decode images off the event loop.
    decode_threads: int = 2
    # Also serve the `ExtendedImageSynapse` route (same forward and guard) for subnet revisions
    # whose validators send that class instead of `ImageSynapse`.
    extended_synapse: bool = True
    # Returned as `model_url` in ExtendedImageSynapse answers (your model's Hugging Face URL).
    model_url: str = ""
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)

    def validate(self, source: str, prefix: str) -> None:
        if self.netuid < 0:
            raise ConfigError(source, f"{prefix}.netuid", "a subnet uid >= 0", self.netuid)
        if self.metagraph_resync_s <= 0:
            raise ConfigError(source, f"{prefix}.metagraph_resync_s", "a number > 0",
                              self.metagraph_resync_s)
        if self.telemetry_port is not None and not 0 < self.telemetry_port < 65536:
            raise ConfigError(source, f"{prefix}.telemetry_port", "a port in 1..65535 or null",
                              self.telemetry_port)
        if self.decode_threads < 1:
            raise ConfigError(source, f"{prefix}.decode_threads", "an integer >= 1", self.decode_threads)
        if self.request_log not in REQUEST_LOG_MODES:
            raise ConfigError(source, f"{prefix}.request_log", f"one of {list(REQUEST_LOG_MODES)}",
                              self.request_log)
        if self.log_summary_s <= 0:
            raise ConfigError(source, f"{prefix}.log_summary_s", "a number of seconds > 0",
                              self.log_summary_s)


def _looks_like_ss58(address: str) -> bool:
    """A cheap structural check (full checksum validation happens when the guard builds a key)."""
    alphabet = set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
    return isinstance(address, str) and 40 <= len(address) <= 50 and set(address) <= alphabet


def parse_miner_settings(data: object, *, source: str) -> MinerSettings:
    """Validate a `miner:` mapping (None or absent means all defaults)."""
    return build_dataclass(MinerSettings, data, source=source, prefix="miner")


def load_settings(path: Path) -> tuple[MinerSettings, CascadeConfig]:
    """Read a root config once: the shell's `miner:` slice and the engine's cascade slice."""
    path = Path(path)
    data = read_yaml(path)
    miner = parse_miner_settings(data.get("miner"), source=str(path))
    cascade = parse_cascade_config(data, source=str(path), base_dir=str(path.resolve().parent))
    # The engine's deadline is the answer budget of every request: it must leave the reply time
    # to travel back before the validator's own timeout.
    if cascade.engine.deadline_ms >= VALIDATOR_TIMEOUT_S * 1000:
        raise ConfigError(str(path), "engine.deadline_ms",
                          f"a number below {VALIDATOR_TIMEOUT_S * 1000:g} (validators wait 9 s)",
                          cascade.engine.deadline_ms)
    return miner, cascade


def resolve_config_path(path: Path | str) -> Path:
    """A config path as given, or else relative to the repository (pm2 may start us elsewhere)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    repo_relative = Path(__file__).resolve().parent.parent / p
    return repo_relative if repo_relative.exists() else p
