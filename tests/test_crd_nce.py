"""Tests of CRD as published by Tian et al. (SPEC section 14): crd_nce_* in desupcon.losses and
desupcon.crd_memory.CRDMemory.

The loss is compared with a naive float64 evaluation of the SPEC formulas written with explicit
Python loops (math / numpy, never the torch path) on the same values.
"""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from desupcon.crd_memory import CRDMemory
from desupcon.losses import crd_nce_logits, crd_nce_loss, crd_nce_normaliser

EPS = 1e-7


# --------------------------------------------------------------------------------------
# Naive float64 references
# --------------------------------------------------------------------------------------


def _np(x):
    return x.detach().cpu().double().numpy()


def _unit(v):
    return v / math.sqrt(float(np.dot(v, v)))


def _ref_scores(embed, rows, tau):
    """exp(v_i . m_ij / tau) for every anchor i and row j, v_i normalised."""
    embed, rows = _np(embed), _np(rows)
    out = np.empty(rows.shape[:2])
    for i in range(rows.shape[0]):
        v = _unit(embed[i])
        for j in range(rows.shape[1]):
            out[i, j] = math.exp(float(np.dot(v, rows[i, j])) / tau)
    return out


def _ref_normaliser(embed, rows, tau, n_data):
    scores = _ref_scores(embed, rows, tau)
    total = 0.0
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            total += scores[i, j]
    return total / scores.size * n_data


def _ref_side(embed, rows, z, n_data, tau):
    scores = _ref_scores(embed, rows, tau)
    b, k = scores.shape[0], scores.shape[1] - 1
    pn = 1.0 / n_data
    total = 0.0
    for i in range(b):
        x = scores[i, 0] / z
        total += math.log(x / (x + k * pn + EPS))
        for j in range(1, k + 1):
            x = scores[i, j] / z
            total += math.log(k * pn / (x + k * pn + EPS))
    return -total / b


def _ref_loss(s, t, s_rows, t_rows, n_data, z_s, z_t, tau):
    return _ref_side(s, t_rows, z_s, n_data, tau) + _ref_side(t, s_rows, z_t, n_data, tau)


def _problem(seed, b=5, k=7, d=16, n_data=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, d, generator=g, dtype=dtype)
    t = torch.randn(b, d, generator=g, dtype=dtype)
    stdv = 1 / math.sqrt(d / 3)
    s_rows = (torch.rand(b, k + 1, d, generator=g, dtype=dtype) * 2 - 1) * stdv
    t_rows = F.normalize(torch.randn(b, k + 1, d, generator=g, dtype=dtype), dim=2)
    return s, t, s_rows, t_rows


# --------------------------------------------------------------------------------------
# The pure loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_loss_matches_naive_reference(seed, tau):
    n_data = 40
    s, t, s_rows, t_rows = _problem(seed, n_data=n_data)
    z_s = _ref_normaliser(s, t_rows, tau, n_data) * (1.3 + seed)  # any fixed constants
    z_t = _ref_normaliser(t, s_rows, tau, n_data) * 0.7
    got = crd_nce_loss(s, t, s_rows, t_rows, n_data, z_s, z_t, temperature=tau)
    want = _ref_loss(s, t, s_rows, t_rows, n_data, z_s, z_t, tau)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_loss_sides_use_the_other_models_bank():
    """Swapping the two banks' rows changes the loss unless the sides are symmetric."""
    n_data, tau = 40, 0.07
    s, t, s_rows, t_rows = _problem(3, n_data=n_data, dtype=torch.float64)
    got = float(crd_nce_loss(s, t, s_rows, t_rows, n_data, 500.0, 900.0, tau))
    want = _ref_side(s, t_rows, 500.0, n_data, tau) + _ref_side(t, s_rows, 900.0, n_data, tau)
    swapped = _ref_side(s, s_rows, 500.0, n_data, tau) + _ref_side(t, t_rows, 900.0, n_data, tau)
    assert got == pytest.approx(want, rel=1e-10)
    assert abs(got - swapped) > 1e-3


def test_normaliser_matches_naive_reference():
    n_data, tau = 40, 0.07
    s, _, _, t_rows = _problem(4, n_data=n_data)
    z = crd_nce_normaliser(crd_nce_logits(s, t_rows, tau), n_data)
    assert isinstance(z, float)
    assert z == pytest.approx(_ref_normaliser(s, t_rows, tau, n_data), rel=1e-5)


def test_loss_promotes_low_precision_inputs():
    s, t, s_rows, t_rows = _problem(5)
    got = crd_nce_loss(s.bfloat16(), t.bfloat16(), s_rows, t_rows, 40, 100.0, 100.0)
    assert got.dtype == torch.float32 and torch.isfinite(got)


def test_gradcheck_float64():
    s, t, s_rows, t_rows = _problem(6, b=3, k=4, d=5, n_data=20, dtype=torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)

    def fn(a, b):
        return crd_nce_loss(a, b, s_rows, t_rows, 20, 30.0, 45.0, temperature=0.5)

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# CRDMemory
# --------------------------------------------------------------------------------------

LABELS = torch.tensor([0] * 7 + [1] * 1 + [2] * 12 + [3] * 5 + [4] * 15)  # N = 40, uneven classes


def _memory(seed=0, dim=16, labels=LABELS):
    return CRDMemory(labels[torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))],
                     dim=dim, generator=torch.Generator().manual_seed(seed))


def test_bank_init_uniform_in_stdv():
    mem = _memory(dim=48)
    stdv = 1 / math.sqrt(48 / 3)
    for bank in (mem.student_bank, mem.teacher_bank):
        assert bank.shape == (40, 48)
        assert float(bank.abs().max()) <= stdv
        assert float(bank.min()) < -0.9 * stdv and float(bank.max()) > 0.9 * stdv
    assert not torch.equal(mem.student_bank, mem.teacher_bank)
    assert mem.z_student is None and mem.z_teacher is None


def test_negatives_other_classes_and_coverage():
    mem = _memory(1)
    labels = mem.labels
    indices = torch.arange(40)  # every anchor, every class (incl. the single-image class 1)
    k = 3000
    negatives = mem.sample_negatives(indices, labels[indices], k, torch.Generator().manual_seed(0))
    assert negatives.shape == (40, k) and negatives.dtype == torch.long
    assert bool((labels[negatives] != labels[indices][:, None]).all())
    for i in range(40):
        y = int(labels[i])
        others = (labels != y).nonzero().squeeze(1)
        counts = torch.bincount(negatives[i], minlength=40)[others].double()
        assert bool((counts > 0).all())  # every image of the other classes is drawn
        expected = k / others.shape[0]  # uniform over the other classes' images
        assert float(((counts - expected) ** 2 / expected).sum()) < 3 * others.shape[0]
    # labels=None looks the anchors' classes up; same generator state -> same draw
    again = mem.sample_negatives(indices, None, k, torch.Generator().manual_seed(0))
    assert torch.equal(negatives, again)


def test_negatives_are_drawn_without_replacement_when_there_are_enough():
    mem = _memory(1)
    labels = mem.labels
    indices = torch.arange(40)
    n_other = [int((labels != labels[i]).sum()) for i in range(40)]
    k = min(n_other)
    g = torch.Generator().manual_seed(0)
    negatives = mem.sample_negatives(indices, None, k, g)
    for i in range(40):  # distinct images of other classes
        row = negatives[i].tolist()
        assert len(set(row)) == k and all(int(labels[j]) != int(labels[i]) for j in row)
    # every other-class image equally likely: anchor 0 over many draws of 5
    counts = torch.zeros(40)
    for _ in range(400):
        counts += torch.bincount(mem.sample_negatives(indices[:1], None, 5, g)[0], minlength=40)
    others = (labels != labels[0]).nonzero().squeeze(1)
    expected = 400 * 5 / len(others)
    assert float(((counts[others] - expected) ** 2 / expected).sum()) < 2.5 * len(others)
    assert float(counts[labels == labels[0]].sum()) == 0
    # one anchor short of candidates (k above its n_other) is drawn with replacement, the others not
    big = max(n_other)
    mixed = mem.sample_negatives(indices, None, big, g)
    for i in range(40):
        distinct = len(set(mixed[i].tolist()))
        assert distinct == big if n_other[i] >= big else distinct <= n_other[i]


def test_contrast_rows_positive_first():
    mem = _memory(2)
    indices = torch.tensor([3, 17, 25])
    negatives = mem.sample_negatives(indices, None, 6, torch.Generator().manual_seed(1))
    s_rows, t_rows = mem.contrast_rows(indices, negatives)
    assert s_rows.shape == t_rows.shape == (3, 7, 16)
    assert torch.equal(s_rows[:, 0], mem.student_bank[indices])
    assert torch.equal(t_rows[:, 1:], mem.teacher_bank[negatives])


def test_update_matches_formula():
    mem = _memory(3)
    before_s, before_t = _np(mem.student_bank), _np(mem.teacher_bank)
    indices = torch.tensor([4, 9, 4, 30])  # 4 twice: the mean of its two embeddings is written
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    mem.update(indices, s.requires_grad_(), t)
    for bank, before, embed in ((mem.student_bank, before_s, s), (mem.teacher_bank, before_t, t)):
        e = _np(embed)
        for slot, rows in ((4, [0, 2]), (9, [1]), (30, [3])):
            v = sum(_unit(e[r]) for r in rows) / len(rows)
            want = _unit(0.5 * before[slot] + 0.5 * v)
            np.testing.assert_allclose(_np(bank[slot]), want, rtol=1e-5, atol=1e-6)
        untouched = [i for i in range(40) if i not in (4, 9, 30)]
        np.testing.assert_array_equal(_np(bank)[untouched], before[untouched])
    assert not mem.student_bank.requires_grad


def test_constants_fixed_at_first_call_only():
    mem = _memory(4)
    g = torch.Generator().manual_seed(4)
    indices = torch.tensor([0, 5, 11, 22, 39])
    s, t = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    banks = mem.student_bank.clone(), mem.teacher_bank.clone()
    loss = mem.loss(s, t, indices, None, 8, generator=g)
    negatives = mem.last_negatives
    rows = torch.cat([indices[:, None], negatives], dim=1)
    s_rows, t_rows = banks[0][rows], banks[1][rows]
    z_s, z_t = mem.z_student, mem.z_teacher
    assert z_s == pytest.approx(_ref_normaliser(s, t_rows, 0.07, 40), rel=1e-5)
    assert z_t == pytest.approx(_ref_normaliser(t, s_rows, 0.07, 40), rel=1e-5)
    assert float(loss) == pytest.approx(_ref_loss(s, t, s_rows, t_rows, 40, z_s, z_t, 0.07), rel=1e-5)
    mem.update(indices, s, t)
    for _ in range(2):
        s2, t2 = torch.randn(5, 16, generator=g) * 3, torch.randn(5, 16, generator=g)
        idx2 = torch.randperm(40, generator=g)[:5]
        mem.loss(s2, t2, idx2, None, 8, generator=g)
        mem.update(idx2, s2, t2)
        assert (mem.z_student, mem.z_teacher) == (z_s, z_t)


def test_gradients_flow_to_both_embeddings():
    mem = _memory(5)
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 16, generator=g, requires_grad=True)
    t = torch.randn(6, 16, generator=g, requires_grad=True)
    indices = torch.arange(6) * 6
    loss = mem.loss(s, t, indices, mem.labels[indices], 10, generator=g)
    loss.backward()
    for x in (s, t):
        assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    assert mem.student_bank.grad is None and mem.teacher_bank.grad is None


@pytest.mark.parametrize("after_step", [False, True])
def test_state_dict_round_trip(after_step):
    mem = _memory(6)
    if after_step:
        g = torch.Generator().manual_seed(6)
        s, t, indices = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g), torch.arange(4)
        mem.loss(s, t, indices, None, 5, generator=g)
        mem.update(indices, s, t)
    buffer = io.BytesIO()
    torch.save(mem.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = _memory(7)  # other init and label order
    other.load_state_dict(state)
    assert torch.equal(other.student_bank, mem.student_bank)
    assert torch.equal(other.teacher_bank, mem.teacher_bank)
    assert torch.equal(other.labels, mem.labels)
    assert (other.z_student, other.z_teacher, other.momentum) == (mem.z_student, mem.z_teacher, mem.momentum)
    assert (other.z_student is None) == (not after_step)
    indices = torch.tensor([1, 2, 3])
    assert torch.equal(other.sample_negatives(indices, None, 50, torch.Generator().manual_seed(0)),
                       mem.sample_negatives(indices, None, 50, torch.Generator().manual_seed(0)))


def test_state_dict_shape_mismatch_rejected():
    state = _memory(8).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        _memory(8, dim=8).load_state_dict(state)
