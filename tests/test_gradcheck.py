"""torch.autograd.gradcheck (float64, finite differences against the analytic backward) on every
contrastive loss of desupcon/losses.py, with respect to every tensor input that can carry a gradient.

The logit losses (KD, DKD, SDD, standardisation) and the published CRD-NCE loss have theirs in
test_logit_losses.py and test_crd_nce.py.
"""

from __future__ import annotations

import pytest
import torch

from desupcon.losses import crd_loss, hybrid_loss, lw_supcrd_loss, supcon_loss

M, D, CLASSES, K = 6, 5, 3, 4
# class 2 has a single member: an anchor without positives (SupCon's zero term) is covered too
LABELS = torch.tensor([0, 1, 0, 1, 0, 2])
BANK_LABELS = torch.tensor([1, 0, 2, 1])


def leaf(*shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()


def check(fn, *inputs, fast: bool = True) -> None:
    """gradcheck; `fast` compares random projections u^T J v of the Jacobian (every entry takes
    part), the full mode every entry separately (one finite difference per input element)."""
    assert all(x.dtype == torch.float64 for x in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon(temperature):
    check(lambda z: supcon_loss(z, LABELS, temperature), leaf(M, D, seed=0))


@pytest.mark.parametrize("with_bank", [False, True])
def test_crd(with_bank):
    s, t = leaf(M, D, seed=1), leaf(M, D, seed=2)
    if with_bank:
        check(lambda a, b, bank: crd_loss(a, b, 0.07, bank=bank), s, t, leaf(K, D, seed=3))
    else:
        check(lambda a, b: crd_loss(a, b, 0.07), s, t)


@pytest.mark.parametrize("with_bank,bank_positives", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("adaptive_beta", [True, False])
@pytest.mark.parametrize("alpha,beta", [(1.0, 10.0), (2.5, 0.5), (1.0, 0.0)])
def test_lw_supcrd(with_bank, bank_positives, adaptive_beta, alpha, beta):
    """Gradients reach the student, the teacher targets, the teacher logits and the bank rows."""
    s, t, logits = leaf(M, D, seed=4), leaf(M, D, seed=5), leaf(M, CLASSES, seed=6)
    options = dict(alpha=alpha, beta=beta, temperature=0.07, adaptive_beta=adaptive_beta,
                   kd_temperature=2.0, bank_positives=bank_positives)
    if with_bank:
        check(lambda a, b, z, bank: lw_supcrd_loss(a, b, z, LABELS, bank=bank, bank_labels=BANK_LABELS,
                                                   **options), s, t, logits, leaf(K, D, seed=7))
    else:
        check(lambda a, b, z: lw_supcrd_loss(a, b, z, LABELS, **options), s, t, logits)


def test_lw_supcrd_full_jacobian():
    s, t = leaf(M, D, seed=12), leaf(M, D, seed=13)
    logits, bank = leaf(M, CLASSES, seed=14), leaf(K, D, seed=15)
    check(lambda a, b, z, r: lw_supcrd_loss(a, b, z, LABELS, alpha=2.0, beta=10.0, bank=r,
                                            bank_labels=BANK_LABELS), s, t, logits, bank, fast=False)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("with_bank", [False, True])
def test_hybrid(lam, with_bank):
    s, t, logits = leaf(M, D, seed=8), leaf(M, D, seed=9), leaf(M, CLASSES, seed=10)
    if with_bank:
        check(lambda a, b, z, bank: hybrid_loss(a, b, z, LABELS, lam=lam, temperature=0.1, bank=bank,
                                                bank_labels=BANK_LABELS), s, t, logits, leaf(K, D, seed=11))
    else:
        check(lambda a, b, z: hybrid_loss(a, b, z, LABELS, lam=lam, temperature=0.1), s, t, logits)
