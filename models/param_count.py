"""Exact parameter counts from a checkpoint's config on disk, for the placement planner.

A transformers checkpoint's `config.json` fixes its architecture, so its parameter count is known
before any weight is read: the model class is built from the config under accelerate's
`init_empty_weights()` (every parameter on the meta device: no memory, no download) and measured
with `compute_module_sizes` at the tier's dtype. The config is found at a local checkpoint path or,
for a hub id, in the local Hugging Face cache (after `natix-miner models pull`); nothing is ever
downloaded here. Where no config is on disk, or the architecture cannot be built (custom code the
planner will not run), the count is None and the planner uses the YAML's `params_m`.

`init_empty_weights` patches `torch.nn.Module.register_parameter` for the whole process while it
is active, so counts are serialised behind one lock and the engine counts before any tier loads.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

from loguru import logger

from cascade.config import DTYPE_BYTES, TierSpec
from cascade.tier import MemoryNeeds

_LOCK = threading.Lock()
_TORCH_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}


def config_dir(spec: TierSpec) -> Optional[Path]:
    """Directory holding the checkpoint's config.json: the local path, or the hub cache snapshot."""
    path = spec.checkpoint_path()
    if not path:
        return None
    local = Path(path)
    if local.is_dir():
        return local if (local / "config.json").is_file() else None
    if local.exists() or "/" not in path:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id=path, filename="config.json")
    return Path(found).parent if isinstance(found, str) else None


def count_parameters(spec: TierSpec, auto_class: str, *, trust_remote_code: bool = False) -> Optional[MemoryNeeds]:
    """Exact parameters and weight bytes of the tier's checkpoint, built empty from its config
    with the transformers `auto_class` (e.g. "AutoModelForImageClassification"); None when no
    config is on disk or it cannot be built."""
    where = config_dir(spec)
    if where is None:
        return None
    try:
        import torch
        import transformers
        from accelerate import init_empty_weights
        from accelerate.utils import compute_module_sizes
    except ImportError as exc:
        logger.debug("tier {}: cannot count parameters ({!r}); using params_m", spec.name, exc)
        return None
    try:
        with _LOCK:
            config = transformers.AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code)
            with init_empty_weights():
                model = getattr(transformers, auto_class).from_config(config, trust_remote_code=trust_remote_code)
        params = sum(p.numel() for p in model.parameters())
        if spec.dtype in _TORCH_DTYPES:
            weights = int(compute_module_sizes(model, dtype=getattr(torch, _TORCH_DTYPES[spec.dtype]))[""])
        else:  # quantised formats: what the planner assumes per parameter
            weights = int(params * DTYPE_BYTES[spec.dtype])
    except Exception as exc:  # noqa: BLE001 - an unbuildable config falls back to params_m
        logger.debug("tier {}: counting {} from {} failed: {!r}", spec.name, auto_class, where, exc)
        return None
    return MemoryNeeds(params=params, weights_bytes=weights,
                       source=f"counted from {where.name}/config.json ({auto_class}, accelerate)")
