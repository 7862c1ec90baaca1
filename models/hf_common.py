"""What every transformers-based tier declares to the engine: its own CUDA stream per worker
thread, and its exact parameter count from the checkpoint's config.

Each tier runs on its own worker thread (`cascade.worker`); on CUDA that thread also gets its own
stream (PyTorch's current stream is per thread), so this tier's kernels do not queue behind
another tier's on the same card. Streams made here are blocking streams: work queued on the
legacy default stream (e.g. by a library that ignores the current stream) still orders correctly
against them.
"""

from __future__ import annotations

from typing import ClassVar

from cascade.tier import MemoryNeeds
from models.param_count import count_parameters


def use_own_cuda_stream(device: str) -> None:
    """Make a fresh CUDA stream on `device` the calling thread's current stream (no-op off CUDA)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        return
    dev = torch.device("cuda:0" if device == "cuda" else device)
    torch.cuda.set_stream(torch.cuda.Stream(device=dev))


class TransformersTierMixin:
    """Mixed into a `Tier` whose checkpoint is a transformers model of class `auto_class`."""

    auto_class: ClassVar[str] = "AutoModel"

    def bind_worker(self, device: str) -> None:
        use_own_cuda_stream(device)

    def memory_needs(self) -> MemoryNeeds:
        return count_parameters(self.spec, self.auto_class) or MemoryNeeds()  # type: ignore[attr-defined]
