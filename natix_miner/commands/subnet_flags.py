"""The subnet's own miner flags, so an operator's existing launch line starts this miner.

The subnet's reference miner (natixnetwork/streetvision-subnet: `start_miner.sh`, `miner.env`,
its pm2 lines and `natix/utils/config.py`) is started with flags this project has no twin for,
e.g. `--neuron.image_detector ViT --blacklist.force_validator_permit True --logging.debug`.
Each is accepted: mapped to the project's own setting where one exists, otherwise accepted with
one warning line that says what this miner does instead. Values are read the way the subnet's
script writes them: `--blacklist.force_validator_permit` alone, or followed by True/False.

Any other unknown `--neuron.*` or `--wandb.*` flag (with its value) is accepted with a warning
too; an unknown flag anywhere else stays an error (exit 2), so a typo such as `--wallet.nmae`
never starts a miner under the default wallet.
"""

import argparse
import dataclasses
from typing import Any, Optional

# Namespaces whose unknown flags cannot change what this miner does.
IGNORED_NAMESPACES = ("--neuron.", "--wandb.")
BLOCK_SECONDS = 12.0
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off", "none", ""}


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def add_subnet_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "the subnet's reference-miner flags",
        "Accepted so an existing start_miner.sh / pm2 line runs; each is mapped or answered with a "
        "one-line warning. Also accepted and ignored, with a warning saying what this miner does "
        "instead: --neuron.image_detector, --neuron.image_detector_config, "
        "--neuron.image_detector_device (the models are the tiers of --config), the "
        "--neuron.video_detector* flags, --neuron.name, --neuron.events_retention_size, "
        "--neuron.dont_save_events, --wandb.* (metrics are on /metrics), --mock and "
        "--subtensor._mock (use --local), --logging.enable_third_party_loggers, --no_prompt, "
        "--no_version_checking, and any other --neuron.* flag.")
    flag = lambda name, **kw: g.add_argument(name, default=None, **kw)  # noqa: E731
    flag("--blacklist.force_validator_permit", nargs="?", const=True, type=parse_bool,
         metavar="BOOL", help="-> miner.guard.require_validator_permit (default on here)")
    flag("--blacklist.allow_non_registered", nargs="?", const=True, type=parse_bool,
         metavar="BOOL", help="not honoured: unregistered callers are always refused "
                              "(admit one with --allow-hotkey)")
    flag("--model_url", metavar="URL", help="-> miner.model_url")
    flag("--neuron.epoch_length", type=int, metavar="BLOCKS",
         help="-> miner.metagraph_resync_s = BLOCKS x 12 s")
    for name in ("image_detector", "image_detector_config", "image_detector_device",
                 "video_detector", "video_detector_config", "video_detector_device"):
        flag(f"--neuron.{name}", metavar="VALUE", help=argparse.SUPPRESS)
    flag("--neuron.name", metavar="NAME", help=argparse.SUPPRESS)
    flag("--neuron.events_retention_size", metavar="BYTES", help=argparse.SUPPRESS)
    flag("--neuron.dont_save_events", action="store_true", help=argparse.SUPPRESS)
    for name in ("notes", "project_name", "entity"):
        flag(f"--wandb.{name}", metavar="VALUE", help=argparse.SUPPRESS)
    flag("--wandb.off", action="store_true", help=argparse.SUPPRESS)
    flag("--wandb.offline", action="store_true", help=argparse.SUPPRESS)
    flag("--mock", action="store_true", help=argparse.SUPPRESS)
    flag("--subtensor._mock", nargs="?", const=True, type=parse_bool, help=argparse.SUPPRESS)
    flag("--logging.enable_third_party_loggers", action="store_true", help=argparse.SUPPRESS)
    flag("--no_prompt", action="store_true", help=argparse.SUPPRESS)
    flag("--no_version_checking", action="store_true", help=argparse.SUPPRESS)


def split_extra(extra: list[str]) -> tuple[list[str], list[str]]:
    """(accepted, rejected) unknown arguments: `--neuron.*` / `--wandb.*` flags with their value
    are accepted; everything else is rejected."""
    accepted: list[str] = []
    rejected: list[str] = []
    i = 0
    while i < len(extra):
        token = extra[i]
        if token.startswith(IGNORED_NAMESPACES):
            accepted.append(token)
            if "=" not in token and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                accepted.append(extra[i + 1])
                i += 1
        else:
            rejected.append(token)
        i += 1
    return accepted, rejected


def apply_subnet_flags(args: argparse.Namespace, settings: Any, *, config_path: str,
                       extra: Optional[list[str]] = None) -> tuple[Any, list[str]]:
    """(settings with the mapped flags applied, one warning line per flag the project ignores)."""
    g = lambda name: getattr(args, name, None)  # noqa: E731 - dotted dests need getattr
    warnings: list[str] = []
    changes: dict[str, Any] = {}
    guard_changes: dict[str, Any] = {}

    permit = g("blacklist.force_validator_permit")
    if permit is not None:
        guard_changes["require_validator_permit"] = permit
        if not permit:
            warnings.append("--blacklist.force_validator_permit false: callers without a validator "
                            "permit are admitted (miner.guard.require_validator_permit: false)")
    if g("blacklist.allow_non_registered"):
        warnings.append("--blacklist.allow_non_registered is not honoured: unregistered hotkeys are "
                        "always refused; admit a trusted caller with --allow-hotkey SS58 or "
                        "miner.guard.allow_hotkeys")
    if g("model_url") is not None:
        changes["model_url"] = g("model_url")
    epoch = g("neuron.epoch_length")
    if epoch is not None:
        if epoch < 1:
            raise argparse.ArgumentTypeError(f"--neuron.epoch_length must be >= 1, got {epoch}")
        changes["metagraph_resync_s"] = epoch * BLOCK_SECONDS

    detectors = [n for n in ("image_detector", "image_detector_config", "image_detector_device",
                             "video_detector", "video_detector_config", "video_detector_device")
                 if g(f"neuron.{n}") is not None]
    if detectors:
        warnings.append(f"--neuron.{detectors[0]}{' (and the other detector flags)' if len(detectors) > 1 else ''} "
                        f"ignored: the models and their devices are the tiers of {config_path}")
    if g("neuron.name") is not None:
        warnings.append("--neuron.name ignored: the process is named by pm2 (--name) and the log "
                        "file by --logging.logging_dir")
    if g("neuron.events_retention_size") is not None or g("neuron.dont_save_events"):
        warnings.append("--neuron.events_retention_size / --neuron.dont_save_events ignored: no "
                        "events file; every answer is in the log (miner.request_log) and /metrics")
    if any(g(f"wandb.{n}") not in (None, False) for n in ("notes", "project_name", "entity", "offline")):
        warnings.append("--wandb.* ignored: no Weights & Biases; metrics are served on /metrics "
                        "(miner.telemetry_port)")
    if g("mock") or g("subtensor._mock"):
        warnings.append("--mock ignored: for a chain-free run use --local --allow-hotkey SS58")
    if g("logging.enable_third_party_loggers"):
        warnings.append("--logging.enable_third_party_loggers ignored: --logging.trace shows "
                        "bittensor's own request lines")
    if g("no_prompt") or g("no_version_checking"):
        warnings.append("--no_prompt / --no_version_checking ignored: this miner never prompts and "
                        "checks no versions")
    accepted, _ = split_extra(list(extra or []))
    for token in accepted:
        if token.startswith("--"):
            warnings.append(f"{token.split('=')[0]} ignored: not a flag this miner has a use for")

    if guard_changes:
        changes["guard"] = dataclasses.replace(settings.guard, **guard_changes)
    return (dataclasses.replace(settings, **changes) if changes else settings), warnings
