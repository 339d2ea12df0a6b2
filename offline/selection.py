"""Which groups of 4 input channels stay dense (paper Sec. 3.2): one mask per layer *input*.

Every strategy scores the K/4 groups and keeps the top ``dense_per_chunk`` of each chunk, so the
mask is balanced for tensor parallelism (docs/FORMAT.md). Matrices that read the same input (q/k/v,
gate/up) share one mask, so their scores are summed before the choice.

- ``activation``: energy of the input channels, sum of ``diag(H)`` over the group.
- ``error``: OBS error that 2:4 pruning of the group causes in a plain SparseGPT sweep.
- ``random``: a control.
"""

from __future__ import annotations

import torch

from vllm_spense.format import GROUP_SIZE

SELECTIONS = ("activation", "error", "random")


def balanced_top_groups(score: torch.Tensor, chunk_size: int, dense_per_chunk: int) -> torch.Tensor:
    """Bool mask [K/4]: in every chunk of ``chunk_size`` channels, the ``dense_per_chunk`` top-scored groups."""
    groups_per_chunk = chunk_size // GROUP_SIZE
    if score.numel() % groups_per_chunk:
        raise ValueError(f"{score.numel() * GROUP_SIZE} input channels is not a multiple of chunk size {chunk_size}")
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if dense_per_chunk == 0:
        return mask
    chunks = score.reshape(-1, groups_per_chunk)
    top = chunks.topk(dense_per_chunk, dim=1).indices
    offsets = torch.arange(chunks.shape[0], device=score.device)[:, None] * groups_per_chunk
    mask[(top + offsets).reshape(-1)] = True
    return mask


def activation_score(hessian_diag: torch.Tensor) -> torch.Tensor:
    return hessian_diag.float().reshape(-1, GROUP_SIZE).sum(-1)


def random_score(num_groups: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(num_groups, generator=generator)
