"""Small torch helpers shared by the transformers-based backends (dtype, device, batching).

Kept here so each backend file holds only what is specific to its model family: every
transformers tier resolves the spec's dtype the same way, moves processor outputs the same way,
and turns a failed batch into per-item errors the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from cascade.config import TierSpec

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def torch_dtype(spec_dtype: str, device: str) -> torch.dtype:
    """The torch dtype to load weights in.

    Half precision only where it is fast and supported (cuda); on cpu everything runs float32
    because bf16/fp16 matmuls there are slow or missing. Quantised dtypes (fp8, int8, int4) are a
    placement figure for vLLM; a transformers tier loads them as bf16 on cuda.
    """
    if not device.startswith("cuda"):
        return torch.float32
    return _DTYPES.get(spec_dtype, torch.bfloat16)


def resolve_device(device: str) -> str:
    """`cuda` -> `cuda:0`; a cuda device on a machine without one is a clear error."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
        return "cuda:0" if device == "cuda" else device
    if device != "cpu":
        raise RuntimeError(f"unsupported device {device!r} (expected cpu, cuda or cuda:N)")
    return device


def checkpoint_or_raise(spec: TierSpec) -> str:
    """The tier's checkpoint (local path or hub id); a tier without one is a clear error."""
    path = spec.checkpoint_path()
    if not path:
        raise RuntimeError(f"tier {spec.name!r} (backend {spec.backend}) needs a 'checkpoint:' "
                           "(Hugging Face id or local path)")
    return path


def to_device(batch: Mapping[str, Any], device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Move a processor's output to `device`; floating tensors (pixels) also take `dtype`."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
        out[key] = value
    return out


def rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Every image as RGB (the contract says RGB; a stray mode must not crash a batch)."""
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def per_item(images: Sequence[Image.Image],
             batch_fn: Callable[[list[Image.Image]], list[Any]]) -> list[Any]:
    """Run `batch_fn` on the batch; if the batch fails, retry item by item so one bad image
    costs only its own slot (its slot holds the Exception)."""
    images = list(images)
    try:
        out = batch_fn(images)
        if len(out) != len(images):
            raise RuntimeError(f"backend returned {len(out)} results for {len(images)} images")
        return out
    except Exception as batch_exc:  # noqa: BLE001 - isolate the failing item below
        if len(images) == 1:
            return [batch_exc]
    results: list[Any] = []
    for im in images:
        try:
            results.extend(batch_fn([im]))
        except Exception as exc:  # noqa: BLE001 - per-item error is the contract
            results.append(exc)
    return results


def clamp_prob(p: float) -> float:
    """A finite probability in [0, 1] (NaN -> 0.5 would hide a bug, so NaN raises)."""
    p = float(p)
    if not np.isfinite(p):
        raise FloatingPointError(f"model produced a non-finite probability {p}")
    return min(1.0, max(0.0, p))


def release(model: Optional[torch.nn.Module]) -> None:
    """Drop a model's device memory (cuda caches too)."""
    if model is not None:
        del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def param_count_m(model: torch.nn.Module) -> float:
    """Parameter count in millions (what a config's `params_m` should say)."""
    return sum(p.numel() for p in model.parameters()) / 1e6
