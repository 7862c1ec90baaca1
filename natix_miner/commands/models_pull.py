"""`natix-miner models pull`: download every checkpoint a config names, before going offline.

Serving never downloads: a production box runs `models pull` once (resumable, with progress), then
the miner loads from the local Hugging Face cache (or from `--dest`). Offline (HF_HUB_OFFLINE=1 or
no network) the command only checks the cache and fails fast, naming every checkpoint that is
missing, so a half-provisioned machine is caught before `serve`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loguru import logger

from natix_miner.commands.flags import add_config_arg

# Backends whose checkpoint is not a file this machine loads.
REMOTE_BACKENDS = {"vlm_openai"}
# Weight formats no backend here loads; skipped to save disk and time.
IGNORE_PATTERNS = ["*.onnx", "onnx/*", "*.msgpack", "*.h5", "flax_model*", "tf_model*", "*.tflite",
                   "openvino/*", "coreml/*", "*.gguf", "original/*"]


@dataclass(frozen=True)
class Pull:
    """One thing to fetch: a whole hub repo, or one file of it (`filename`)."""

    tier: str
    repo_id: str
    filename: Optional[str] = None
    revision: Optional[str] = None

    @property
    def label(self) -> str:
        return f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id


def add_parser(subparsers: "argparse._SubParsersAction", name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="download the model checkpoints a config names (models pull)",
        description="Model weights management. `pull` downloads every Hugging Face checkpoint the "
                    "config's tiers name (resumable; progress bars), skipping tiers whose checkpoint "
                    "is a local path that exists and remote-server tiers (vlm_openai). Offline "
                    "(HF_HUB_OFFLINE=1 or no network) it checks the cache only and exits 1 naming "
                    "what is missing. Gated repos (DINOv3, some Llama/Gemma) need HF_TOKEN set and "
                    "the licence accepted on the hub.")
    p.add_argument("action", choices=["pull"], help="what to do: pull (the only action)")
    add_config_arg(p)  # the GPU configs are the ones with checkpoints: --config configs/gpu-1x.yaml
    p.add_argument("--dest", type=Path, default=None,
                   help="Hugging Face cache directory to download into (default: the standard cache, "
                        "HF_HUB_CACHE or ~/.cache/huggingface/hub); serve with HF_HUB_CACHE=<dest>")
    p.add_argument("--all-tiers", action="store_true",
                   help="also fetch tiers with enabled: false (default: enabled tiers only)")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be fetched and whether it is already cached; download nothing")
    p.set_defaults(func=run)
    return p


def plan_pulls(config: Path, all_tiers: bool = False) -> tuple[list[Pull], list[str]]:
    """(hub downloads, notes about tiers that need none) for a config."""
    from cascade.config import load_cascade_config

    cfg = load_cascade_config(config)
    pulls: list[Pull] = []
    notes: list[str] = []
    for spec in cfg.tiers if all_tiers else cfg.active_tiers:
        opts = spec.options or {}
        if spec.backend in REMOTE_BACKENDS:
            notes.append(f"{spec.name}: served remotely ({spec.checkpoint}); nothing to fetch")
            continue
        if spec.checkpoint is None:
            notes.append(f"{spec.name}: no checkpoint (weights ship with pip packages)")
            continue
        local = spec.resolve(spec.checkpoint)
        if local is not None and local.exists():
            notes.append(f"{spec.name}: local path {local}")
            continue
        filename = opts.get("hf_filename") if spec.backend == "yolo" else None
        if spec.backend == "yolo" and filename is None:
            notes.append(f"{spec.name}: '{spec.checkpoint}' is an Ultralytics asset; Ultralytics "
                         "downloads it on first load (run scripts/gpu_smoke.sh once while online) "
                         "or set options.hf_filename to fetch it from a hub repo")
            continue
        if spec.checkpoint.count("/") != 1 or spec.checkpoint.startswith((".", "/", "~")):
            notes.append(f"{spec.name}: checkpoint '{spec.checkpoint}' is neither an existing local "
                         "path nor a hub id (owner/name)")
            continue
        pulls.append(Pull(tier=spec.name, repo_id=spec.checkpoint, filename=filename,
                          revision=opts.get("revision") if isinstance(opts.get("revision"), str) else None))
        speculative = opts.get("speculative_config") or {}
        draft = speculative.get("model") if isinstance(speculative, dict) else None
        if isinstance(draft, str) and draft.count("/") == 1:
            pulls.append(Pull(tier=f"{spec.name} (speculative draft)", repo_id=draft))
    unique = list({(p.repo_id, p.filename, p.revision): p for p in pulls}.values())
    return unique, notes


def _fetch(pull: Pull, dest: Optional[Path], local_only: bool) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = str(dest) if dest else None
    if pull.filename:
        return hf_hub_download(pull.repo_id, pull.filename, revision=pull.revision, cache_dir=cache,
                               local_files_only=local_only)
    return snapshot_download(pull.repo_id, revision=pull.revision, cache_dir=cache,
                             local_files_only=local_only, ignore_patterns=IGNORE_PATTERNS)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "ON")


def run(args: argparse.Namespace) -> int:
    from cascade.errors import ConfigError

    try:
        from natix_miner.settings import resolve_config_path

        pulls, notes = plan_pulls(resolve_config_path(args.config), args.all_tiers)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        logger.info(note)
    if not pulls:
        print("nothing to download")
        return 0
    offline = _offline()
    missing: list[tuple[Pull, str]] = []
    # Cache check first: fast, and all an offline machine can do.
    cached = {}
    for pull in pulls:
        try:
            cached[pull] = _fetch(pull, args.dest, local_only=True)
        except Exception as exc:  # noqa: BLE001 - any miss is reported below
            cached[pull] = None
            if offline or args.dry_run:
                missing.append((pull, type(exc).__name__))
    if args.dry_run:
        for pull in pulls:
            state = "cached" if cached[pull] else "MISSING"
            print(f"{state:8s} {pull.label}  (tier {pull.tier})")
        return 1 if missing else 0
    if offline and missing:
        return _report_missing(missing, offline=True, dest=args.dest)
    from tqdm import tqdm

    to_get = [p for p in pulls if not cached[p]]
    for pull in tqdm(to_get, desc="checkpoints", unit="repo", disable=not to_get):
        try:
            path = _fetch(pull, args.dest, local_only=False)
            logger.info("{} -> {}", pull.label, path)
        except Exception as exc:  # noqa: BLE001 - keep going, report every failure at the end
            missing.append((pull, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            if _looks_offline(exc):
                # No network: every remaining download would fail the same way; say so now.
                missing.extend((p, "not attempted (no network)")
                               for p in to_get[to_get.index(pull) + 1:])
                break
    if missing:
        return _report_missing(missing, offline=False, dest=args.dest)
    for pull in pulls:
        print(f"ok {pull.label}")
    if args.dest:
        print(f"serve with: export HF_HUB_CACHE={Path(args.dest).resolve()}")
    return 0


def _looks_offline(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("connect", "offline", "name resolution", "name or service", "timed out",
                                   "network is unreachable", "max retries"))


def _report_missing(missing: list[tuple[Pull, str]], *, offline: bool, dest: Optional[Path]) -> int:
    why = "HF_HUB_OFFLINE is set, so only the local cache was checked" if offline \
        else "downloads failed"
    where = f" in {dest}" if dest else ""
    lines = [f"error: {len(missing)} checkpoint(s) missing{where} ({why}):"]
    lines += [f"  - {p.label} (tier {p.tier}): {reason}" for p, reason in missing]
    lines.append("fix: run `natix-miner models pull --config ...` on a machine with internet "
                 "(HF_TOKEN set for gated repos), or copy its Hugging Face cache here")
    print("\n".join(lines), file=sys.stderr)
    return 1
