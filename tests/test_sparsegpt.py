"""SparseGPT's compensation against a direct least-squares reference, and the dense-region invariants."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import random_dense_mask
from vllm_spense.offline.selection import balanced_top_groups
from vllm_spense.offline.sparsegpt import HessianError, magnitude_2_4, sparsify_weight, wanda_2_4


def least_squares_reference(weight: torch.Tensor, x: torch.Tensor, damp: float, pruned: torch.Tensor,
                            order: torch.Tensor) -> torch.Tensor:
    """Sweep the columns in ``order``; at each pruned weight, zero it and re-fit the not-yet-visited columns of
    its row by least squares on the damped calibration inputs (fp64, lstsq: no Hessian inverse involved)."""
    n, k = weight.shape
    x = x.double()
    lam = damp * (x * x).sum(0).mean() / x.shape[0]
    x_aug = torch.cat((x / x.shape[0] ** 0.5, lam.sqrt() * torch.eye(k, dtype=torch.float64)))
    w = weight.double().clone()
    for row in range(n):
        for pos, col in enumerate(order.tolist()):
            if not pruned[row, col]:
                continue
            rest = order[pos + 1:]
            target = x_aug[:, col] * w[row, col]
            w[row, col] = 0
            if rest.numel():
                w[row, rest] += torch.linalg.lstsq(x_aug[:, rest], target[:, None]).solution[:, 0]
    return w


@pytest.mark.parametrize("order", ["natural", "dense-last"])
@pytest.mark.parametrize("blocksize", [8, 128])
def test_compensation_matches_least_squares(order, blocksize):
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    n, k, samples = 7, 48, 400
    # Correlated input channels (as in real activations), so compensation has something to work with.
    x = torch.randn(samples, k, generator=generator) @ torch.randn(k, k, generator=generator)
    weight = torch.randn(n, k, generator=generator)
    mask = random_dense_mask(k, 16, 2, generator)
    hessian = x.t() @ x / samples
    result = sparsify_weight(weight, hessian, dense_mask=mask, order=order, blocksize=blocksize, damp=0.01)
    pruned = result.weight == 0
    groups = torch.arange(k // 4)
    group_order = torch.cat((groups[~mask], groups[mask])) if order == "dense-last" else groups
    columns = (group_order[:, None] * 4 + torch.arange(4)).reshape(-1)
    reference = least_squares_reference(weight, x, 0.01, pruned, columns)
    error = (result.weight.double() - reference).norm() / reference.norm()
    assert error < 1e-4, f"relative difference {error:.2e} from the least-squares sweep"

    # 2:4 outside the dense groups, nothing pruned inside them.
    per_group = pruned.view(n, -1, 4).sum(-1)
    assert (per_group[:, ~mask] == 2).all()
    assert (per_group[:, mask] == 0).all()
    # Compensation pays: less output error than zeroing the same weights with no update (the ratio: median
    # 0.72 over 1200 random draws, 0.92 in one CI draw, so the margin is 0.95).
    no_update = weight.masked_fill(pruned, 0)
    assert (x @ (result.weight - weight).t()).norm() < 0.95 * (x @ (no_update - weight).t()).norm()


def test_dense_groups_lower_the_error():
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(300, 64, generator=generator)
    weight = torch.randn(16, 64, generator=generator)
    hessian = x.t() @ x / 300
    plain = sparsify_weight(weight, hessian)
    mask = balanced_top_groups(plain.group_loss, 32, 2)
    hybrid = sparsify_weight(weight, hessian, dense_mask=mask)
    assert hybrid.loss < plain.loss
    assert plain.group_loss.shape == (16,) and torch.isclose(plain.group_loss.sum(), torch.tensor(plain.loss))


def test_unstructured_sparsity_fraction():
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(200, 64, generator=generator)
    result = sparsify_weight(torch.randn(32, 64, generator=generator), x.t() @ x / 200, sparsity=0.375)
    assert abs((result.weight == 0).float().mean().item() - 0.375) < 0.01


def test_magnitude_and_wanda_keep_the_largest_scores():
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    weight = torch.randn(9, 32, generator=generator)
    norms = torch.rand(32, generator=generator) + 0.1
    for pruned, score in ((magnitude_2_4(weight), weight.abs()), (wanda_2_4(weight, norms), weight.abs() * norms.sqrt())):
        kept = pruned.view(9, 8, 4) != 0
        assert (kept.sum(-1) == 2).all()
        s = score.view(9, 8, 4)
        assert (s.masked_fill(~kept, float("inf")).amin(-1) >= s.masked_fill(kept, -float("inf")).amax(-1)).all()


def test_failed_cholesky_gives_advice():
    hessian = -torch.eye(8)
    with pytest.raises(HessianError, match="Raise --damp .* \\(--nsamples\\)"):
        sparsify_weight(torch.randn(4, 8), hessian, damp=0.01, layer="model.layers.0.self_attn.q_proj")


def test_balanced_top_groups_matches_brute_force():
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    score = torch.rand(48, generator=generator)  # 3 chunks of 16 groups (64 channels)
    mask = balanced_top_groups(score, 64, 4)
    for chunk in range(3):
        part = score[chunk * 16:(chunk + 1) * 16]
        expected = set(part.argsort(descending=True)[:4].tolist())
        assert set(mask[chunk * 16:(chunk + 1) * 16].nonzero().flatten().tolist()) == expected
