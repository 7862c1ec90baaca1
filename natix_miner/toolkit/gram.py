"""Gram anchoring: keep a fine-tuned backbone's patch-feature similarity structure near the
frozen starting backbone's (the teacher), so dense features do not collapse while the head learns.

The idea is DINOv3's (Siméoni et al. 2025): the Gram matrix of L2-normalised patch features,
G = F Fᵀ ([N, N] per image), holds which patches look alike; anchoring G rather than the features
themselves leaves the student free to move its features as long as their relations hold. The loss
is the squared Frobenius distance between student and teacher Gram matrices divided by N²
(the mean squared entry), averaged over the batch: 0 when the student equals the teacher, growing
as it drifts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gram_matrix(patches: torch.Tensor) -> torch.Tensor:
    """[M, N, N] cosine-similarity Gram matrices of [M, N, C] patch features."""
    f = F.normalize(patches.float(), dim=-1)
    return f @ f.transpose(-1, -2)


def gram_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the Gram matrices (a scalar; gradients flow into `student`)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student patches {tuple(student.shape)} and teacher patches "
                         f"{tuple(teacher.shape)} differ")
    return (gram_matrix(student) - gram_matrix(teacher.detach())).pow(2).mean()
