"""Which backbone weights a trained head belongs to: the record in head.json, hashed and checked.

Why: a head fitted on fine-tuned features is garbage on the pretrained backbone (and the other way
round). `natix-miner train --mode finetune|lora` writes the backbone next to the head under
`<artifacts_dir>/<tier>/` and records it in head.json as `backbone: {kind, path, sha256}`; a
head-mode head records `backbone: null` (the pretrained weights the config names). At load the
tier calls `resolve()`: the file must exist and hash to the recorded sha256, else the tier refuses
to load with the command that makes a consistent pair. The sha256 is also the weights' identity
that `describe()` reports and that any other runtime of the same weights (e.g. an ONNX export)
can key on.

Kinds: `state_dict` (one safetensors file of a torch state dict), `hf_dir` (a transformers
`save_pretrained` directory; the hash is that of its `model.safetensors`), `peft_adapter` (a peft
adapter directory; the hash is that of `adapter_model.safetensors`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

from cascade.errors import MissingArtifactError

KINDS = {"state_dict": None, "hf_dir": "model.safetensors", "peft_adapter": "adapter_model.safetensors"}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hashed_file(kind: str, path: Path) -> Path:
    """The file whose sha256 identifies a backbone artefact of `kind` at `path`."""
    if kind not in KINDS:
        raise ValueError(f"backbone kind must be one of {sorted(KINDS)}, got {kind!r}")
    name = KINDS[kind]
    return Path(path) if name is None else Path(path) / name


def record(kind: str, path: Path, tier_dir: Path) -> dict[str, Any]:
    """The head.json entry for a backbone artefact just written at `path` (inside `tier_dir`)."""
    path = Path(path)
    return {"kind": kind, "path": str(path.relative_to(tier_dir)),
            "sha256": sha256_file(hashed_file(kind, path))}


def resolve(entry: Optional[dict[str, Any]], tier_dir: Path, *, tier: str, fix: str) -> Optional[tuple[str, Path, str]]:
    """(kind, absolute path, sha256) of the backbone a head was trained on; None = pretrained.

    Raises MissingArtifactError when the recorded file is missing or its content changed.
    """
    if not entry:
        return None
    kind, rel, want = entry.get("kind"), entry.get("path"), entry.get("sha256")
    if kind not in KINDS or not rel or not want:
        raise MissingArtifactError(f"fine-tuned backbone of tier {tier}: head.json entry {entry!r} "
                                   "is incomplete", fix=fix)
    path = Path(tier_dir) / rel
    target = hashed_file(kind, path)
    if not target.exists():
        raise MissingArtifactError(f"fine-tuned backbone of tier {tier} at {target} (the head was "
                                   "trained on it)", fix=fix)
    got = sha256_file(target)
    if got != want:
        raise MissingArtifactError(f"fine-tuned backbone of tier {tier} at {target} (sha256 {got[:12]} "
                                   f"differs from the {want[:12]} its head was trained on)", fix=fix)
    return kind, path, got
