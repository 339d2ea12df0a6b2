"""SparseGPT (Frantar & Alistarh, 2023) with a dense region: the OBS sweep that SpenseGPT runs per matrix.

``sparsify_weight(W, H, ...)`` prunes ``W [N, K]`` given the layer-input Hessian ``H = X^T X / n [K, K]``.
Columns are visited left to right; each pruned weight's error is spread over the columns not yet
visited through the inverse Hessian's Cholesky factor (lazy block updates of ``blocksize`` columns).
Dense groups (SpenseGPT, paper Sec. 3) are never pruned but still absorb compensation. With
``order="dense-last"`` the sweep visits them after every 2:4 group, so they absorb the error of all
of them; ``"natural"`` keeps the channel order. The input weight is never modified.

With ``quantize`` (FP8 checkpoints) every kept weight is also rounded as its column is visited, and the
rounding error is compensated like the pruning error, as SparseGPT's joint sparsify-and-quantize pass does.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from vllm_spense.format import GROUP_SIZE, SPARSE_KEPT

ORDERS = ("dense-last", "natural")


class HessianError(RuntimeError):
    """The damped Hessian is not positive definite; the message says what to change."""


@dataclasses.dataclass
class SparsifyResult:
    weight: torch.Tensor  # pruned and compensated, same dtype as the input
    loss: float  # sum over rows of the OBS error, in the Hessian's norm
    group_loss: torch.Tensor  # [K/4] OBS error incurred at each group of 4 channels


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float, layer: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, as SparseGPT uses it."""
    h = hessian.clone()
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    try:
        factor = torch.linalg.cholesky(h)
        h = torch.cholesky_inverse(factor)
        return torch.linalg.cholesky(h, upper=True)
    except torch.linalg.LinAlgError as error:
        raise HessianError(
            f"layer {layer}: the Hessian with damping {damp} is not positive definite ({error}). Raise "
            f"--damp (e.g. to {min(1.0, damp * 10):g}) or calibrate on more samples (--nsamples), so that "
            f"every input channel is seen") from None


def sparsify_weight(weight: torch.Tensor, hessian: torch.Tensor, *, dense_mask: torch.Tensor | None = None,
                    sparsity: float | None = None, order: str = "dense-last", blocksize: int = 128,
                    damp: float = 0.01, layer: str = "<weight>",
                    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SparsifyResult:
    """Prune ``weight`` to 2:4 outside ``dense_mask`` (or to unstructured ``sparsity`` when given).

    ``quantize`` maps one column ``[N]`` (float32, pruned entries already zero) to its rounded values."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, found {order!r}")
    if blocksize % GROUP_SIZE:
        raise ValueError(f"blocksize must be a multiple of {GROUP_SIZE}, found {blocksize}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"layer {layer}: Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    if dense_mask is None:
        dense_mask = torch.zeros(k // GROUP_SIZE, dtype=torch.bool, device=w.device)
    dense_mask = dense_mask.to(w.device)

    # Channels never seen in calibration carry no information: zero them, as SparseGPT does.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    group_order = torch.arange(k // GROUP_SIZE, device=w.device)
    if order == "dense-last":
        group_order = torch.cat((group_order[~dense_mask], group_order[dense_mask]))
    perm = (group_order[:, None] * GROUP_SIZE + torch.arange(GROUP_SIZE, device=w.device)).reshape(-1)
    w = w[:, perm]
    h = h[perm][:, perm]
    prunable = (~dense_mask)[group_order].repeat_interleave(GROUP_SIZE)  # per permuted column
    hinv = _inverse_hessian_factor(h, damp, layer)

    losses = torch.zeros(n, k, device=w.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if sparsity is not None:
            score = w1 ** 2 / d[None, :] ** 2
            score[:, ~prunable[i1:i2]] = float("inf")
            threshold = torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
            mask1 = score <= threshold
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            if sparsity is None and i % GROUP_SIZE == 0 and prunable[i1 + i]:
                score = w1[:, i:i + GROUP_SIZE] ** 2 / d[i:i + GROUP_SIZE] ** 2
                drop = torch.topk(score, GROUP_SIZE - SPARSE_KEPT, dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            q = col.masked_fill(mask1[:, i], 0)
            if quantize is not None:
                q = quantize(q)
            q1[:, i] = q
            losses[:, i1 + i] = (col - q) ** 2 / d[i] ** 2 / 2
            err = (col - q) / d[i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inverse = torch.argsort(perm)
    w = w[:, inverse]
    losses = losses[:, inverse]
    return SparsifyResult(
        weight=w.to(weight.dtype),
        loss=float(losses.sum()),
        group_loss=losses.sum(0).reshape(-1, GROUP_SIZE).sum(-1),
    )


def mask_2_4(score: torch.Tensor, dense_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask [N, K] keeping the 2 highest scores of every 2:4 group and all of every dense group."""
    n, k = score.shape
    groups = score.reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(SPARSE_KEPT, dim=-1).indices, True)
    if dense_mask is not None:
        keep[:, dense_mask.to(score.device), :] = True
    return keep.reshape(n, k)


def magnitude_2_4(weight: torch.Tensor, dense_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain magnitude pruning: no calibration, no compensation."""
    return weight * mask_2_4(weight.abs().float(), dense_mask)


def wanda_2_4(weight: torch.Tensor, hessian_diag: torch.Tensor, dense_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, no compensation."""
    score = weight.abs().float() * hessian_diag.to(weight.device).float().sqrt()[None, :]
    return weight * mask_2_4(score, dense_mask)
