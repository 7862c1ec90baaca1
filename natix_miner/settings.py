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
    # Long side the tiers need at most. A larger JPEG is decoded with DCT scaling (1/2, 1/4 or
    # 1/8, almost free) to the smallest scale whose long side is still >= this; 0 = always full size.
    max_side: int = 2048
    # Memory one decode may take: the decoded pixels (after DCT scaling) x bytes per pixel,
    # checked from the header before any pixel is decoded. Over it: refused as too_many_pixels.
    max_decoded_mib: int = 192
    # Time one decode may take; past it the request gets the fallback answer at once (the decode
    # thread finishes on its own). Also capped by the request's remaining answer budget.
    timeout_ms: float = 2000.0

    def validate(self, source: str, prefix: str) -> None:
        for name in ("max_base64_chars", "max_bytes", "max_pixels", "max_decoded_mib"):
            if getattr(self, name) < 1:
                raise ConfigError(source, f"{prefix}.{name}", "an integer >= 1", getattr(self, name))
        if self.max_side != 0 and self.max_side < 64:
            raise ConfigError(source, f"{prefix}.max_side", "0 (off) or an integer >= 64", self.max_side)
        if not self.timeout_ms > 0:
            raise ConfigError(source, f"{prefix}.timeout_ms", "a number > 0", self.timeout_ms)
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
    # Freshness from the SIGNED nonce (the dendrite's send time in ns), not from the unsigned
    # `timeout` header: a request signed longer ago than this plus `clock_skew_s`, or more than
    # `clock_skew_s` in the future, is refused, and each nonce is accepted once. Validators wait 9 s.
    max_request_age_s: float = 9.0
    # Allowed difference between the validator's clock and ours, each way (bittensor allows 4 s).
    clock_skew_s: float = 5.0
    # A caller refused as unregistered or without a permit triggers an early metagraph re-sync
    # (it may have gained its permit since the last sync), at most one per this many seconds.
    resync_min_interval_s: float = 60.0
    # How long such a refusal waits for that re-sync before it is answered with the old view.
    resync_wait_s: float = 2.0
    # Refusals are logged once per caller and reason per period (always counted) ...
    refusal_log_period_s: float = 600.0
    # ... and at most this many distinct lines per period (then one summary line).
    refusal_log_lines: int = 50

    def validate(self, source: str, prefix: str) -> None:
        for name in ("max_request_age_s", "resync_min_interval_s", "refusal_log_period_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(source, f"{prefix}.{name}", "a number > 0", getattr(self, name))
        for name in ("clock_skew_s", "resync_wait_s"):
            if getattr(self, name) < 0:
                raise ConfigError(source, f"{prefix}.{name}", "a number >= 0", getattr(self, name))
        if self.refusal_log_lines < 0:
            raise ConfigError(source, f"{prefix}.refusal_log_lines", "an integer >= 0",
                              self.refusal_log_lines)
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
class ServerSettings:
    """The axon's HTTP server: what a slow, oversized or malformed request may cost."""

    # Seconds a connection may take to deliver a request's headers (from connecting, or from the
    # previous answer on a kept-alive connection); then it is closed.
    header_timeout_s: float = 5.0
    # Seconds the body may take after the headers; then 408 and the connection is closed.
    body_timeout_s: float = 8.0
    # Seconds an idle kept-alive connection stays open.
    keep_alive_s: float = 5.0
    # Open connections (plus requests in flight) beyond which new requests get 503.
    max_connections: int = 512
    # Largest header block accepted (bittensor's dendrite sends about 2 KB); more gets 431.
    max_header_bytes: int = 8192

    def validate(self, source: str, prefix: str) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(source, f"{prefix}.{name}", "a number > 0", getattr(self, name))
        if self.max_connections < 1:
            raise ConfigError(source, f"{prefix}.max_connections", "an integer >= 1",
                              self.max_connections)
        if self.max_header_bytes < 4096:
            raise ConfigError(source, f"{prefix}.max_header_bytes", "an integer >= 4096",
                              self.max_header_bytes)


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
    # glibc malloc arenas for the whole process (each thread otherwise gets its own, up to 8
    # per core, and keeps the big buffers it freed); also pins the mmap threshold so big
    # buffers go back to the OS. 0 = glibc's defaults.
    malloc_arena_max: int = 2
    # Also serve the `ExtendedImageSynapse` route (same forward and guard) for subnet revisions
    # whose validators send that class instead of `ImageSynapse`.
    extended_synapse: bool = True
    # Returned as `model_url` in ExtendedImageSynapse answers (your model's Hugging Face URL).
    model_url: str = ""
    # Revision setting: body fields the signature must cover (`required_hash_fields` of the
    # synapse). SN72's validators hash none, so the image is not signed; set [image] only when
    # the subnet's validators do too, or every request is refused (400, body hash mismatch).
    synapse_hash_fields: list[str] = field(default_factory=list)
    # Consecutive failed metagraph re-syncs after which health, logs and metrics say the guard's
    # view is stale.
    metagraph_fail_alert: int = 3
    # Requests answered by the engine at once; more wait, the highest-stake caller first, and a
    # waiter whose budget runs out gets the fallback answer. 0 = no limit (no stake priority).
    max_concurrent_forwards: int = 32
    # A request with less answer budget than this left (measured from its arrival) gets the
    # fallback answer at once instead of an engine call that cannot finish in time.
    min_engine_budget_ms: float = 250.0
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

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
        hashable = ("image", "testnet_label")
        for i, name in enumerate(self.synapse_hash_fields):
            if name not in hashable:
                raise ConfigError(source, f"{prefix}.synapse_hash_fields[{i}]",
                                  f"one of {list(hashable)}", name)
        if self.malloc_arena_max < 0:
            raise ConfigError(source, f"{prefix}.malloc_arena_max", "an integer >= 0 (0 = glibc default)",
                              self.malloc_arena_max)
        if self.metagraph_fail_alert < 1:
            raise ConfigError(source, f"{prefix}.metagraph_fail_alert", "an integer >= 1",
                              self.metagraph_fail_alert)
        if self.max_concurrent_forwards < 0:
            raise ConfigError(source, f"{prefix}.max_concurrent_forwards", "an integer >= 0 (0 = off)",
                              self.max_concurrent_forwards)
        if self.min_engine_budget_ms < 0:
            raise ConfigError(source, f"{prefix}.min_engine_budget_ms", "a number >= 0",
                              self.min_engine_budget_ms)


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
