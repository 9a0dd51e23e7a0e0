"""Tests of desupcon.losses (SPEC section 4).

Every loss is compared with a naive float64 evaluation of its formula written with
explicit Python loops over anchors and pairs (math / numpy, never the torch path).
The implementation receives float32 tensors; the references receive the very same
float32 values converted to float64, so the only difference is the arithmetic.
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from desupcon.losses import crd_loss, hybrid_loss, lw_supcrd_loss, supcon_loss

RTOL = 1e-5  # acceptance tolerance for float32 implementation vs float64 reference
EPS = 1e-8  # default probability floor of lw_supcrd_loss


# --------------------------------------------------------------------------------------
# Naive float64 references
# --------------------------------------------------------------------------------------


def _unit_rows(x):
    """float64 numpy copy of x with every row scaled to unit L2 norm."""
    x = np.asarray(x.detach().cpu().double().numpy() if torch.is_tensor(x) else x, np.float64)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = x[i] / math.sqrt(float(np.dot(x[i], x[i])))
    return out


def _int_list(y):
    return [int(v) for v in (y.tolist() if torch.is_tensor(y) else y)]


def _dot(a, b):
    return float(sum(float(u) * float(v) for u, v in zip(a, b)))


def naive_supcon(z, labels, tau):
    """SupCon ("out" form), student only.

    L_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau) ),
    P(i) = {p != i : y_p = y_i}; an anchor with P(i) empty contributes 0 but still counts
    in the mean over the M anchors.
    """
    z = _unit_rows(z)
    y = _int_list(labels)
    m = len(y)
    total = 0.0
    for i in range(m):
        denom = sum(math.exp(_dot(z[i], z[a]) / tau) for a in range(m) if a != i)
        positives = [p for p in range(m) if p != i and y[p] == y[i]]
        if not positives:
            continue
        li = 0.0
        for p in positives:
            li -= math.log(math.exp(_dot(z[i], z[p]) / tau) / denom)
        total += li / len(positives)
    return total / m


def naive_crd(s, t, tau, bank=None):
    """In-batch InfoNCE, student anchor vs teacher targets (+ bank rows, all negatives).

    L_i = -log( exp(s_i.t_i/tau) / sum_j exp(s_i.t_j/tau) ), j over the M teacher
    embeddings followed by the K bank rows.
    """
    s = _unit_rows(s)
    targets = _unit_rows(t)
    if bank is not None and bank.shape[0] > 0:
        targets = np.concatenate([targets, _unit_rows(bank)], axis=0)
    m = s.shape[0]
    total = 0.0
    for i in range(m):
        denom = sum(math.exp(_dot(s[i], targets[j]) / tau) for j in range(targets.shape[0]))
        total -= math.log(math.exp(_dot(s[i], targets[i]) / tau) / denom)
    return total / m


def naive_softmax(row, temperature):
    """p_c = exp(z_c/T) / sum_c' exp(z_c'/T) (max-shifted, float64)."""
    row = [float(v) / temperature for v in row]
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    norm = sum(exps)
    return [e / norm for e in exps]


def naive_lw_supcrd(
    s,
    t,
    teacher_logits,
    labels,
    alpha=1.0,
    beta=10.0,
    tau=0.07,
    adaptive_beta=True,
    kd_temperature=1.0,
    bank=None,
    bank_labels=None,
    eps=EPS,
):
    """Label-weighted supervised CRD.

    p_i = softmax(teacher_logits_i / T_kd); contrast set = teacher embeddings t then bank
    rows, with labels y then bank_labels.  P(i) = {k : y_k = y_i} (k = i included),
    N(i) = the rest.
      w_pull_i   = alpha * p_i(y_i)
      beta_i     = beta / (p_i(y_i) + 0.5)  if adaptive_beta else beta
      w_push_ij  = beta_i * (1 - p_i(y_j))
      A_i = w_pull_i * sum_{k in P(i)} exp(s_i.t_k/tau)
      R_i = sum_{j in N(i)} w_push_ij * exp(s_i.t_j/tau)
      L_i = -log( A_i / (A_i + R_i) ) / alpha
    The probability terms p_i(y_i) and 1 - p_i(y_j) are floored at eps (irrelevant for the
    random inputs used in the comparisons).
    """
    s = _unit_rows(s)
    targets = _unit_rows(t)
    y = _int_list(labels)
    contrast_labels = list(y)
    if bank is not None and bank.shape[0] > 0:
        targets = np.concatenate([targets, _unit_rows(bank)], axis=0)
        contrast_labels += _int_list(bank_labels)
    logits = teacher_logits.detach().cpu().double().numpy()
    m = s.shape[0]
    total = 0.0
    for i in range(m):
        p = naive_softmax(logits[i], kd_temperature)
        p_true = max(p[y[i]], eps)
        beta_i = beta / (p_true + 0.5) if adaptive_beta else beta
        a_sum = 0.0
        r_sum = 0.0
        for k, yk in enumerate(contrast_labels):
            e = math.exp(_dot(s[i], targets[k]) / tau)
            if yk == y[i]:
                a_sum += e
            else:
                r_sum += beta_i * max(1.0 - p[yk], eps) * e
        a_i = alpha * p_true * a_sum
        total += -math.log(a_i / (a_i + r_sum)) / alpha
    return total / m


# --------------------------------------------------------------------------------------
# Input generation
# --------------------------------------------------------------------------------------


def make_batch(seed, m=12, d=12, c=7, k=0, singleton=True, logit_scale=2.0):
    """Random float32 inputs.  Labels are drawn from classes 0..c-2 and, if `singleton`,
    the last anchor gets class c-1, which then appears exactly once in the batch.
    Bank labels are drawn from all c classes (so some match batch labels, some do not)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(m, d, generator=g) * 1.5
    t = torch.randn(m, d, generator=g) * 0.7
    logits = torch.randn(m, c, generator=g) * logit_scale
    if singleton:
        labels = torch.randint(0, c - 1, (m,), generator=g)
        labels[-1] = c - 1
    else:
        labels = torch.randint(0, c, (m,), generator=g)
    labels = labels.to(torch.int64)
    bank = torch.randn(k, d, generator=g) * 2.0
    bank_labels = torch.randint(0, c, (k,), generator=g).to(torch.int64)
    return dict(s=s, t=t, logits=logits, labels=labels, bank=bank, bank_labels=bank_labels)


def _bank_args(b, with_bank):
    if with_bank:
        return dict(bank=b["bank"], bank_labels=b["bank_labels"])
    return dict(bank=None, bank_labels=None)


def assert_close(got, expected, rtol=RTOL, atol=0.0):
    got = float(got.detach()) if torch.is_tensor(got) else float(got)
    assert math.isfinite(got), f"loss is not finite: {got}"
    assert got == pytest.approx(expected, rel=rtol, abs=atol), f"got {got!r}, expected {expected!r}"


SEEDS = [0, 1, 2]


# --------------------------------------------------------------------------------------
# Agreement with the naive float64 formulas
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [0.07, 0.2, 0.5])
@pytest.mark.parametrize("m,c", [(8, 5), (16, 10)])
def test_supcon_matches_naive(seed, tau, m, c):
    b = make_batch(seed, m=m, d=10, c=c)
    # the last anchor's class appears once: it has no positives
    assert int((b["labels"] == b["labels"][-1]).sum()) == 1
    got = supcon_loss(b["s"], b["labels"], temperature=tau)
    assert_close(got, naive_supcon(b["s"], b["labels"], tau))


def test_supcon_default_temperature_is_0_07():
    b = make_batch(3)
    assert_close(supcon_loss(b["s"], b["labels"]), naive_supcon(b["s"], b["labels"], 0.07))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [0.07, 0.3])
@pytest.mark.parametrize("k", [0, 6, 12])
def test_crd_matches_naive(seed, tau, k):
    b = make_batch(seed, m=10, d=14, k=k)
    bank = b["bank"] if k else None
    got = crd_loss(b["s"], b["t"], temperature=tau, bank=bank)
    assert_close(got, naive_crd(b["s"], b["t"], tau, bank))


def test_crd_default_temperature_is_0_07():
    b = make_batch(4, k=8)
    assert_close(crd_loss(b["s"], b["t"], bank=b["bank"]), naive_crd(b["s"], b["t"], 0.07, b["bank"]))


LW_CONFIGS = list(
    itertools.product(
        [1.0, 2.0, 5.0, 10.0],  # alpha
        [0.5, 10.0, 40.0],  # beta
        [True, False],  # adaptive_beta
        [1.0, 4.0],  # kd_temperature
        [False, True],  # with bank
    )
)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha,beta,adaptive,kd_t,with_bank", LW_CONFIGS)
def test_lw_supcrd_matches_naive(seed, alpha, beta, adaptive, kd_t, with_bank):
    b = make_batch(seed, m=12, d=10, c=6, k=9)
    kw = dict(alpha=alpha, beta=beta, adaptive_beta=adaptive, kd_temperature=kd_t)
    got = lw_supcrd_loss(b["s"], b["t"], b["logits"], b["labels"], temperature=0.07, **kw, **_bank_args(b, with_bank))
    expected = naive_lw_supcrd(b["s"], b["t"], b["logits"], b["labels"], tau=0.07, **kw, **_bank_args(b, with_bank))
    assert_close(got, expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [0.05, 0.2])
@pytest.mark.parametrize("m,d,c,k", [(8, 8, 5, 0), (16, 16, 10, 12), (9, 12, 8, 6)])
def test_lw_supcrd_matches_naive_other_shapes_and_temperatures(seed, tau, m, d, c, k):
    b = make_batch(seed + 10, m=m, d=d, c=c, k=k)
    bank_kw = dict(bank=b["bank"], bank_labels=b["bank_labels"]) if k else {}
    got = lw_supcrd_loss(b["s"], b["t"], b["logits"], b["labels"], temperature=tau, **bank_kw)
    assert_close(got, naive_lw_supcrd(b["s"], b["t"], b["logits"], b["labels"], tau=tau, **bank_kw))


def test_lw_supcrd_defaults():
    """Defaults: alpha=1, beta=10, tau=0.07, adaptive beta on, T_kd=1."""
    b = make_batch(5, k=10)
    got = lw_supcrd_loss(b["s"], b["t"], b["logits"], b["labels"], bank=b["bank"], bank_labels=b["bank_labels"])
    expected = naive_lw_supcrd(
        b["s"], b["t"], b["logits"], b["labels"], alpha=1.0, beta=10.0, tau=0.07, adaptive_beta=True,
        kd_temperature=1.0, bank=b["bank"], bank_labels=b["bank_labels"],
    )
    assert_close(got, expected)


def test_lw_supcrd_bank_entries_of_anchor_class_are_positives():
    """If every contrast entry (bank rows included) has the anchor's class, R_i = 0 and the
    loss is exactly 0: bank rows of the anchor's class must not be treated as negatives."""
    b = make_batch(6, m=8, c=5, k=6, singleton=False)
    labels = torch.full((8,), 2, dtype=torch.int64)
    bank_labels = torch.full((6,), 2, dtype=torch.int64)
    s = b["s"].clone().requires_grad_(True)
    t = b["t"].clone().requires_grad_(True)
    with_bank = lw_supcrd_loss(s, t, b["logits"], labels, bank=b["bank"], bank_labels=bank_labels)
    # every contrast entry is a positive, so R_i = 0 and L_i = 0 exactly
    expected = naive_lw_supcrd(b["s"], b["t"], b["logits"], labels, bank=b["bank"], bank_labels=bank_labels)
    assert expected == 0.0
    assert abs(float(with_bank.detach())) < 1e-6
    # N(i) is empty for every anchor: the gradient must still be defined (no NaN)
    with_bank.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lam", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("with_bank", [False, True])
def test_hybrid_matches_naive(seed, lam, with_bank):
    b = make_batch(seed, m=12, d=10, c=6, k=8)
    kw = dict(alpha=2.0, beta=5.0, temperature=0.1, adaptive_beta=True, kd_temperature=4.0)
    got = hybrid_loss(b["s"], b["t"], b["logits"], b["labels"], lam=lam, **kw, **_bank_args(b, with_bank))
    ref_kw = dict(kw)
    tau = ref_kw.pop("temperature")
    expected = lam * naive_supcon(b["s"], b["labels"], tau) + (1 - lam) * naive_lw_supcrd(
        b["s"], b["t"], b["logits"], b["labels"], tau=tau, **ref_kw, **_bank_args(b, with_bank)
    )
    assert_close(got, expected)


def test_hybrid_default_lambda_is_half():
    b = make_batch(7)
    got = hybrid_loss(b["s"], b["t"], b["logits"], b["labels"])
    expected = 0.5 * naive_supcon(b["s"], b["labels"], 0.07) + 0.5 * naive_lw_supcrd(
        b["s"], b["t"], b["logits"], b["labels"]
    )
    assert_close(got, expected)


@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("with_bank", [False, True])
def test_hybrid_endpoints(lam, with_bank):
    b = make_batch(8, k=7)
    kw = dict(alpha=5.0, beta=3.0, temperature=0.1, adaptive_beta=False, kd_temperature=4.0, **_bank_args(b, with_bank))
    got = hybrid_loss(b["s"], b["t"], b["logits"], b["labels"], lam=lam, **kw)
    if lam == 1.0:
        expected = supcon_loss(b["s"], b["labels"], temperature=0.1)
    else:
        expected = lw_supcrd_loss(b["s"], b["t"], b["logits"], b["labels"], **kw)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# Extreme teachers: finite loss and gradients
# --------------------------------------------------------------------------------------


def _extreme_logits(labels, c, right, scale=70.0):
    """logits = scale * one_hot(class).  scale 70: softmax puts ~1 on the class and
    e^-70 ~ 4e-31 elsewhere; scale 1000: the small probabilities underflow to exactly 0
    (float32 and float64) and the probability floor eps is what keeps the loss finite.
    `right`: the class is the true label; otherwise a wrong class."""
    cls = labels if right else (labels + 1) % c
    return scale * F.one_hot(cls, c).to(torch.float32)


@pytest.mark.parametrize("right", [True, False], ids=["confident-right", "confident-wrong"])
@pytest.mark.parametrize("alpha", [1.0, 10.0])
@pytest.mark.parametrize("with_bank", [False, True])
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("scale", [70.0, 1000.0])
def test_lw_supcrd_extreme_teacher_finite(right, alpha, with_bank, adaptive, scale):
    c = 6
    b = make_batch(11, m=12, d=10, c=c, k=9)
    logits = _extreme_logits(b["labels"], c, right, scale)
    p = torch.softmax(logits.double(), dim=1)
    assert float(p.min()) < 1e-29  # the probabilities really go down to ~1e-30 (or 0)
    s = b["s"].clone().requires_grad_(True)
    t = b["t"].clone().requires_grad_(True)
    bank_kw = _bank_args(b, with_bank)
    loss = lw_supcrd_loss(s, t, logits, b["labels"], alpha=alpha, temperature=0.05, adaptive_beta=adaptive, **bank_kw)
    assert torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and t.grad is not None
    assert torch.isfinite(s.grad).all()
    assert torch.isfinite(t.grad).all()
    assert s.grad.abs().sum() > 0
    # the naive value with p_i(y_i) and 1 - p_i(y_j) floored at eps = 1e-8 (for a confident,
    # correct teacher at scale 70 no floor is even reached)
    expected = naive_lw_supcrd(
        b["s"], b["t"], logits, b["labels"], alpha=alpha, tau=0.05, adaptive_beta=adaptive, **bank_kw
    )
    assert_close(loss, expected)


@pytest.mark.parametrize("scale", [70.0, 1000.0])
@pytest.mark.parametrize("with_bank", [False, True])
def test_lw_supcrd_two_classes_teacher_confidently_predicts_the_other(scale, with_bank):
    """Two classes; the teacher puts all its mass on the other class.  Every negative j of
    anchor i then has 1 - p_i(y_j) ~ 0, so R_i exists only through the eps floor, and
    p_i(y_i) ~ 0 as well: loss and gradients must stay finite and match the floored formula."""
    g = torch.Generator().manual_seed(31)
    m, d, k = 10, 8, 6
    labels = torch.arange(m) % 2
    bank_labels = torch.arange(k) % 2
    s = torch.randn(m, d, generator=g).requires_grad_(True)
    t = torch.randn(m, d, generator=g).requires_grad_(True)
    bank = torch.randn(k, d, generator=g)
    logits = _extreme_logits(labels, 2, right=False, scale=scale)
    bank_kw = dict(bank=bank, bank_labels=bank_labels) if with_bank else {}
    loss = lw_supcrd_loss(s, t, logits, labels, temperature=0.05, **bank_kw)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert_close(loss, naive_lw_supcrd(s, t, logits, labels, tau=0.05, **bank_kw))


@pytest.mark.parametrize("right", [True, False], ids=["confident-right", "confident-wrong"])
@pytest.mark.parametrize("alpha", [1.0, 10.0])
@pytest.mark.parametrize("with_bank", [False, True])
def test_hybrid_extreme_teacher_finite(right, alpha, with_bank):
    c = 6
    b = make_batch(12, m=12, d=10, c=c, k=9)
    logits = _extreme_logits(b["labels"], c, right)
    s = b["s"].clone().requires_grad_(True)
    t = b["t"].clone().requires_grad_(True)
    loss = hybrid_loss(s, t, logits, b["labels"], lam=0.5, alpha=alpha, temperature=0.05, **_bank_args(b, with_bank))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


def test_lw_supcrd_confident_wrong_is_worse_than_confident_right():
    """A confidently wrong teacher gives almost no pull weight: the loss must be larger."""
    c = 6
    b = make_batch(13, m=12, d=10, c=c)
    args = (b["s"], b["t"])
    right = lw_supcrd_loss(*args, _extreme_logits(b["labels"], c, True), b["labels"], temperature=0.05)
    wrong = lw_supcrd_loss(*args, _extreme_logits(b["labels"], c, False), b["labels"], temperature=0.05)
    assert torch.isfinite(wrong) and float(wrong) > float(right)


@pytest.mark.parametrize("with_bank", [False, True])
def test_crd_and_supcon_finite_gradients_at_low_temperature(with_bank):
    b = make_batch(14, k=9)
    s = b["s"].clone().requires_grad_(True)
    t = b["t"].clone().requires_grad_(True)
    loss = crd_loss(s, t, temperature=0.05, bank=b["bank"] if with_bank else None) + supcon_loss(
        s, b["labels"], temperature=0.05
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


# --------------------------------------------------------------------------------------
# Invariances and identities
# --------------------------------------------------------------------------------------


def _all_losses(b, with_bank=True, scale_s=1.0, scale_t=1.0, scale_bank=1.0):
    bank = b["bank"] * scale_bank if with_bank else None
    bank_labels = b["bank_labels"] if with_bank else None
    s, t = b["s"] * scale_s, b["t"] * scale_t
    kw = dict(alpha=2.0, beta=10.0, temperature=0.1, kd_temperature=4.0)
    return {
        "supcon": supcon_loss(s, b["labels"], temperature=0.1),
        "crd": crd_loss(s, t, temperature=0.1, bank=bank),
        "lw_supcrd": lw_supcrd_loss(s, t, b["logits"], b["labels"], bank=bank, bank_labels=bank_labels, **kw),
        "hybrid": hybrid_loss(s, t, b["logits"], b["labels"], lam=0.3, bank=bank, bank_labels=bank_labels, **kw),
    }


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_bank", [False, True])
def test_batch_permutation_invariance(seed, with_bank):
    b = make_batch(seed, m=14, d=10, c=6, k=10)
    before = _all_losses(b, with_bank)
    perm = torch.randperm(14, generator=torch.Generator().manual_seed(100 + seed))
    assert not torch.equal(perm, torch.arange(14))
    pb = dict(b, s=b["s"][perm], t=b["t"][perm], labels=b["labels"][perm], logits=b["logits"][perm])
    after = _all_losses(pb, with_bank)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=RTOL, atol=0.0, msg=name)


@pytest.mark.parametrize("seed", SEEDS)
def test_bank_permutation_invariance(seed):
    b = make_batch(seed, m=10, d=10, c=6, k=12)
    before = _all_losses(b)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(200 + seed))
    pb = dict(b, bank=b["bank"][perm], bank_labels=b["bank_labels"][perm])
    after = _all_losses(pb)
    for name in ("crd", "lw_supcrd", "hybrid"):
        torch.testing.assert_close(after[name], before[name], rtol=RTOL, atol=0.0, msg=name)


def test_bank_changes_the_loss():
    """Guard for the permutation tests: the bank is actually used."""
    b = make_batch(0, m=10, d=10, c=6, k=12)
    with_bank, without = _all_losses(b, True), _all_losses(b, False)
    for name in ("crd", "lw_supcrd", "hybrid"):
        assert abs(float(with_bank[name]) - float(without[name])) > 1e-3, name


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [0, 9])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_crd_equals_cross_entropy(seed, k, tau):
    b = make_batch(seed, m=12, d=10, k=k)
    bank = b["bank"] if k else None
    targets = torch.cat([b["t"], b["bank"]]) if k else b["t"]
    logits = F.normalize(b["s"], dim=1) @ F.normalize(targets, dim=1).T / tau
    expected = F.cross_entropy(logits, torch.arange(12))
    torch.testing.assert_close(crd_loss(b["s"], b["t"], temperature=tau, bank=bank), expected, rtol=RTOL, atol=1e-6)


def test_supcon_anchor_without_positives():
    """Labels [0,0,1,1,2]: anchor 4 has no positives; it contributes 0 but counts in the
    mean over 5 (not 4) anchors."""
    g = torch.Generator().manual_seed(21)
    z = torch.randn(5, 8, generator=g).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2])
    loss = supcon_loss(z, labels, temperature=0.07)
    assert torch.isfinite(loss)
    expected = naive_supcon(z, labels, 0.07)
    assert_close(loss, expected)
    # the mean over the 4 anchors that have positives would be 5/4 of this
    assert float(loss.detach()) != pytest.approx(expected * 5 / 4, rel=1e-3)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_supcon_all_anchors_without_positives_is_zero():
    g = torch.Generator().manual_seed(22)
    z = torch.randn(6, 8, generator=g).requires_grad_(True)
    loss = supcon_loss(z, torch.arange(6), temperature=0.07)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert z.grad is None or torch.isfinite(z.grad).all()


@pytest.mark.parametrize("with_bank", [False, True])
def test_scale_invariance(with_bank):
    b = make_batch(9, k=10)
    before = _all_losses(b, with_bank)
    after = _all_losses(b, with_bank, scale_s=3.7, scale_t=0.25, scale_bank=6.0)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=RTOL, atol=0.0, msg=name)


@pytest.mark.parametrize("with_bank", [False, True])
def test_output_is_float32_scalar(with_bank):
    b = make_batch(10, k=10)
    for name, value in _all_losses(b, with_bank).items():
        assert isinstance(value, torch.Tensor), name
        assert value.dim() == 0, name
        assert value.dtype == torch.float32, name


def test_float64_inputs_give_float64_and_tight_agreement():
    """With float64 inputs the output keeps the input dtype and agrees with the naive
    formulas to float64 accuracy."""
    b = make_batch(15, m=10, d=10, c=6, k=8)
    b64 = {key: (v.double() if v.is_floating_point() else v) for key, v in b.items()}
    kw = dict(alpha=5.0, beta=10.0, temperature=0.07, adaptive_beta=True, kd_temperature=4.0)
    lw = lw_supcrd_loss(b64["s"], b64["t"], b64["logits"], b64["labels"], bank=b64["bank"],
                        bank_labels=b64["bank_labels"], **kw)
    sc = supcon_loss(b64["s"], b64["labels"], temperature=0.07)
    cr = crd_loss(b64["s"], b64["t"], temperature=0.07, bank=b64["bank"])
    for value in (lw, sc, cr):
        assert value.dtype == torch.float64 and value.dim() == 0
    ref_kw = dict(kw)
    ref_kw["tau"] = ref_kw.pop("temperature")
    assert_close(lw, naive_lw_supcrd(b["s"], b["t"], b["logits"], b["labels"], bank=b["bank"],
                                     bank_labels=b["bank_labels"], **ref_kw), rtol=1e-10)
    assert_close(sc, naive_supcon(b["s"], b["labels"], 0.07), rtol=1e-10)
    assert_close(cr, naive_crd(b["s"], b["t"], 0.07, b["bank"]), rtol=1e-10)


# --------------------------------------------------------------------------------------
# Direction sanity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_bank", [False, True])
def test_lw_supcrd_moving_student_towards_own_class_lowers_loss(seed, with_bank):
    """Teacher embeddings cluster by class.  Moving every student embedding towards the
    mean of the (normalised) teacher embeddings of its own class lowers the loss, step by step."""
    g = torch.Generator().manual_seed(300 + seed)
    m, d, c, k = 12, 10, 4, 8
    labels = torch.arange(m) % c
    bank_labels = torch.arange(k) % c
    prototypes = F.normalize(torch.randn(c, d, generator=g), dim=1)
    t = prototypes[labels] + 0.3 * torch.randn(m, d, generator=g)
    bank = prototypes[bank_labels] + 0.3 * torch.randn(k, d, generator=g)
    logits = torch.randn(m, c, generator=g)
    s0 = F.normalize(torch.randn(m, d, generator=g), dim=1)
    t_unit = F.normalize(t, dim=1)
    centroid = torch.stack([t_unit[labels == labels[i]].mean(0) for i in range(m)])
    centroid = F.normalize(centroid, dim=1)
    bank_kw = dict(bank=bank, bank_labels=bank_labels) if with_bank else {}
    values = []
    for step in [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]:
        s = s0 + step * centroid
        values.append(float(lw_supcrd_loss(s, t, logits, labels, **bank_kw)))
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values
    assert values[-1] < 0.5 * values[0], values


def test_lw_supcrd_gradient_pulls_towards_own_class():
    """-dL/ds_i points towards the same-class teacher embeddings more than towards the others."""
    g = torch.Generator().manual_seed(400)
    m, d, c = 12, 10, 4
    labels = torch.arange(m) % c
    prototypes = F.normalize(torch.randn(c, d, generator=g), dim=1)
    t = prototypes[labels] + 0.2 * torch.randn(m, d, generator=g)
    s = F.normalize(torch.randn(m, d, generator=g), dim=1).requires_grad_(True)
    loss = lw_supcrd_loss(s, t, torch.randn(m, c, generator=g), labels)
    loss.backward()
    descent = -s.grad
    t_unit = F.normalize(t, dim=1)
    for i in range(m):
        same = (labels == labels[i])
        towards_same = float(descent[i] @ t_unit[same].mean(0))
        towards_other = float(descent[i] @ t_unit[~same].mean(0))
        assert towards_same > towards_other, i
