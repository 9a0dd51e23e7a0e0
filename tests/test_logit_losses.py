"""Tests of the logit distillers of desupcon.losses (SPEC section 13) and of forward_feature_map.

Every function is compared with a naive float64 evaluation of its formula written with explicit
Python loops over rows and classes (math / numpy, never the torch path). The implementation
receives float32 tensors; the references receive the same float32 values converted to float64.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.losses import dkd_loss, kd_loss, region_logits, sdd_loss, standardize_logits
from desupcon.models import build_encoder

RTOL, ATOL = 1e-5, 1e-6  # float32 implementation vs float64 reference
SEEDS = (0, 1, 2)
CLASSES = (10, 100)


# --------------------------------------------------------------------------------------
# Naive float64 references
# --------------------------------------------------------------------------------------


def _np(x):
    return np.asarray(x.detach().cpu().double().numpy() if torch.is_tensor(x) else x, np.float64)


def _softmax(row, temperature, skip=None):
    """softmax(row / T) over the columns other than `skip`, as a dict column -> probability."""
    cols = [k for k in range(len(row)) if k != skip]
    top = max(row[k] / temperature for k in cols)
    e = {k: math.exp(row[k] / temperature - top) for k in cols}
    total = sum(e.values())
    return {k: v / total for k, v in e.items()}


def _kl(p, q):
    return sum(p[k] * (math.log(p[k]) - math.log(q[k])) for k in p if p[k] > 0)


def ref_kd_rows(zs, zt, temperature):
    zs, zt = _np(zs), _np(zt)
    return [temperature ** 2 * _kl(_softmax(zt[i], temperature), _softmax(zs[i], temperature))
            for i in range(zs.shape[0])]


def ref_dkd_rows(zs, zt, labels, alpha, beta, temperature):
    zs, zt = _np(zs), _np(zt)
    out = []
    for i in range(zs.shape[0]):
        y = int(labels[i])
        ps, pt = _softmax(zs[i], temperature), _softmax(zt[i], temperature)
        bs = {0: ps[y], 1: 1 - ps[y]}
        bt = {0: pt[y], 1: 1 - pt[y]}
        hat_s, hat_t = _softmax(zs[i], temperature, skip=y), _softmax(zt[i], temperature, skip=y)
        a = float(alpha[i]) if np.ndim(alpha) else float(alpha)
        b = float(beta[i]) if np.ndim(beta) else float(beta)
        out.append(temperature ** 2 * (a * _kl(bt, bs) + b * _kl(hat_t, hat_s)))
    return out


def ref_standardize(z, eps=1e-7):
    z = _np(z)
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        k = z.shape[1]
        mean = sum(z[i]) / k
        std = math.sqrt(sum((v - mean) ** 2 for v in z[i]) / (k - 1))
        for j in range(k):
            out[i, j] = (z[i, j] - mean) / (std + eps)
    return out


def ref_region_logits(fmap, weight, bias, scales):
    """Region logits (B, K, N) from block means (H, W multiples of every scale)."""
    fmap, weight, bias = _np(fmap), _np(weight), _np(bias)
    batch, _, height, width = fmap.shape
    regions = []
    for s in sorted(scales):
        h, w = height // s, width // s
        for i in range(s):
            for j in range(s):
                regions.append((i * h, (i + 1) * h, j * w, (j + 1) * w))
    out = np.empty((batch, weight.shape[0], len(regions)))
    for b in range(batch):
        for n, (r0, r1, c0, c1) in enumerate(regions):
            vec = fmap[b, :, r0:r1, c0:c1].mean(axis=(1, 2))
            for k in range(weight.shape[0]):
                out[b, k, n] = float(np.dot(weight[k], vec)) + bias[k]
    return out


def ref_sdd(zs, zt, labels, base, alpha, beta, temperature, complementary_weight, standardize):
    zs, zt = _np(zs), _np(zt)
    batch, _, n_regions = zs.shape
    total = 0.0
    for b in range(batch):
        y = int(labels[b])
        global_right = int(np.argmax(zt[b, :, 0])) == y
        for n in range(n_regions):
            s_row, t_row = zs[b, :, n][None], zt[b, :, n][None]
            if standardize:
                s_row, t_row = ref_standardize(s_row), ref_standardize(t_row)
            if base == "kd":
                loss = ref_kd_rows(s_row, t_row, temperature)[0]
            else:
                loss = ref_dkd_rows(s_row, t_row, [y], alpha, beta, temperature)[0]
            right = int(np.argmax(zt[b, :, n])) == y
            total += (complementary_weight if right != global_right else 1.0) * loss
    return total / (batch * n_regions)


def _logits(seed, batch, k, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(batch, k, generator=g) * scale).to(dtype)
    zt = (torch.randn(batch, k, generator=g) * scale).to(dtype)
    y = torch.randint(0, k, (batch,), generator=g)
    return zs, zt, y


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(_np(actual), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------
# KD, DKD, standardisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("temperature", (1.0, 4.0))
def test_kd_matches_reference(seed, k, temperature):
    zs, zt, _ = _logits(seed, 8, k)
    rows = ref_kd_rows(zs, zt, temperature)
    _close(kd_loss(zs, zt, temperature), np.mean(rows))
    _close(kd_loss(zs, zt, temperature, reduction="none"), rows)
    assert kd_loss(zs, zt, temperature).dtype == torch.float32


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0), (2.0, "tensor")])
def test_dkd_matches_reference(seed, k, alpha, beta):
    zs, zt, y = _logits(seed, 8, k)
    if beta == "tensor":
        beta = torch.rand(8, generator=torch.Generator().manual_seed(seed + 10)) * 5
    rows = ref_dkd_rows(zs, zt, y, alpha, _np(beta) if torch.is_tensor(beta) else beta, 4.0)
    _close(dkd_loss(zs, zt, y, alpha, beta, 4.0), np.mean(rows))
    _close(dkd_loss(zs, zt, y, alpha, beta, 4.0, reduction="none"), rows)


def test_half_inputs_are_computed_in_float32():
    zs, zt, y = _logits(0, 8, 10)
    assert kd_loss(zs.half(), zt.half()).dtype == torch.float32
    assert dkd_loss(zs.bfloat16(), zt.bfloat16(), y).dtype == torch.float32
    _close(kd_loss(zs.half(), zt.half()), np.mean(ref_kd_rows(zs.half(), zt.half(), 4.0)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("temperature", (1.0, 4.0))
def test_dkd_with_per_sample_beta_one_minus_pty_is_kd(seed, k, temperature):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        zs, zt, y = _logits(seed, 16, k, dtype=dtype)
        p_ty = F.softmax(zt / temperature, dim=1).gather(1, y[:, None]).squeeze(1)
        dkd = dkd_loss(zs, zt, y, alpha=1.0, beta=1 - p_ty, temperature=temperature, reduction="none")
        kd = kd_loss(zs, zt, temperature, reduction="none")
        torch.testing.assert_close(dkd, kd, rtol=tol, atol=tol)


def test_reduction_and_beta_shape_are_validated():
    zs, zt, y = _logits(0, 4, 10)
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(zs, zt, reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        dkd_loss(zs, zt, y, reduction="batchmean")
    with pytest.raises(ValueError, match="beta"):
        dkd_loss(zs, zt, y, beta=torch.ones(5))
    with pytest.raises(ValueError, match="shape"):
        kd_loss(zs, zt[:, :9])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", CLASSES)
def test_standardize_matches_reference_and_normalises(seed, k):
    z, _, _ = _logits(seed, 8, k)
    out = standardize_logits(z)
    _close(out, ref_standardize(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=1, correction=1), torch.ones(8), atol=1e-5, rtol=0)
    for a, c in ((0.5, -5.0), (3.0, 10.0), (20.0, 0.0)):
        torch.testing.assert_close(standardize_logits(a * z + c), out, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Region logits
# --------------------------------------------------------------------------------------


def _feature_map(seed, batch=3, channels=6, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(batch, channels, size, size, generator=g))


def _classifier(seed, channels=6, k=10):
    torch.manual_seed(seed)
    return nn.Linear(channels, k)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", (4, 8))
@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 2), (1,), (4, 1, 2)])
def test_region_logits_match_reference(seed, size, scales):
    fmap, fc = _feature_map(seed, size=size), _classifier(seed)
    out = region_logits(fmap, fc, scales)
    n = sum(s * s for s in scales)
    assert out.shape == (3, 10, n)
    _close(out, ref_region_logits(fmap, fc.weight, fc.bias, scales), rtol=1e-5, atol=1e-5)


def ref_adaptive_regions(fmap, weight, bias, scales, grid=4):
    """SDD's pooling by hand: adaptive 4x4 cells (rows floor(i H / 4) to ceil((i + 1) H / 4)), then
    each level's regions as means of the grid cells they cover."""
    fmap, weight, bias = _np(fmap), _np(weight), _np(bias)
    batch, channels, height, width = fmap.shape
    cells = np.empty((batch, channels, grid, grid))
    for i in range(grid):
        r0, r1 = (i * height) // grid, -(-((i + 1) * height) // grid)
        for j in range(grid):
            c0, c1 = (j * width) // grid, -(-((j + 1) * width) // grid)
            cells[:, :, i, j] = fmap[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    regions = []
    for s in sorted(scales):
        step = grid // s
        for i in range(s):
            for j in range(s):
                regions.append(cells[:, :, i * step:(i + 1) * step, j * step:(j + 1) * step].mean(axis=(2, 3)))
    vecs = np.stack(regions, axis=2)  # (B, C, N)
    return np.einsum("kc,bcn->bkn", weight, vecs) + bias[None, :, None]


@pytest.mark.parametrize("size", (7, 6, 2, 3))
@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 2)])
def test_region_logits_pool_to_the_4x4_grid_first_at_any_map_size(size, scales):
    fmap, fc = _feature_map(5, size=size), _classifier(5)
    out = region_logits(fmap, fc, scales)
    _close(out, ref_adaptive_regions(fmap, fc.weight, fc.bias, scales), rtol=1e-5, atol=1e-5)
    if size == 7:  # pooling 7x7 straight to 2x2 would give other regions
        direct = fc(torch.nn.functional.adaptive_avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)).transpose(1, 2)
        assert not torch.allclose(out[:, :, 1:5], direct, atol=1e-4)


@pytest.mark.parametrize("size", (4, 8, 12))
def test_region_zero_is_global_and_levels_average_to_it(size):
    fmap, fc = _feature_map(3, size=size), _classifier(3)
    out = region_logits(fmap, fc, (1, 2, 4))
    global_logits = fc(fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(out[:, :, 0], global_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, 1:5].mean(dim=2), global_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, 5:21].mean(dim=2), global_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scales,size,message", [
    ((0, 1, 2), 8, "positive"),
    ((1, -2), 8, "positive"),
    ((1, 3, 4), 8, "divide"),
    ((1, 2, 2), 8, "repeat"),
    ((2, 4), 8, "include 1"),
    ((), 8, "empty"),
    ((1, 3), 8, "divide the 4x4 grid"),
])
def test_region_logits_validates(scales, size, message):
    with pytest.raises(ValueError, match=message):
        region_logits(_feature_map(0, size=size), _classifier(0), scales)


# --------------------------------------------------------------------------------------
# SDD
# --------------------------------------------------------------------------------------


def _regions(seed, batch, k, n, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(batch, k, n, generator=g) * scale).to(dtype)
    zt = (torch.randn(batch, k, n, generator=g) * scale).to(dtype)
    y = torch.randint(0, k, (batch,), generator=g)
    return zs, zt, y


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("base", ("kd", "dkd"))
@pytest.mark.parametrize("standardize", (False, True))
def test_sdd_matches_reference(seed, k, base, standardize):
    zs, zt, y = _regions(seed, 3, k, 21)
    # Make some teacher regions right so both weights occur.
    zt[0, y[0], :10] += 20.0
    zt[1, y[1], 0] += 20.0
    temperature = 2.0 if standardize else 4.0
    got = sdd_loss(zs, zt, y, base=base, alpha=1.5, beta=8.0, temperature=temperature,
                   complementary_weight=2.0, standardize=standardize)
    want = ref_sdd(zs, zt, y, base, 1.5, 8.0, temperature, 2.0, standardize)
    _close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("base", ("kd", "dkd"))
@pytest.mark.parametrize("standardize", (False, True))
def test_sdd_with_one_scale_is_the_base_loss(seed, base, standardize):
    zs, zt, y = _regions(seed, 8, 100, 1)
    got = sdd_loss(zs, zt, y, base=base, alpha=1.0, beta=8.0, temperature=4.0,
                   complementary_weight=5.0, standardize=standardize)
    s, t = zs[:, :, 0], zt[:, :, 0]
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    want = kd_loss(s, t, 4.0) if base == "kd" else dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_sdd_with_one_scale_from_region_logits_is_dkd_on_global_logits():
    fmap_s, fmap_t = _feature_map(1, size=4), _feature_map(2, size=8)
    fc_s, fc_t = _classifier(1), _classifier(2)
    y = torch.tensor([0, 3, 9])
    got = sdd_loss(region_logits(fmap_s, fc_s, (1,)), region_logits(fmap_t, fc_t, (1,)), y)
    want = dkd_loss(fc_s(fmap_s.mean(dim=(2, 3))), fc_t(fmap_t.mean(dim=(2, 3))), y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sdd_weight_rule():
    """Teacher regions built so that which rows are complementary is known in advance."""
    k, n = 5, 5
    y = torch.tensor([1, 2, 0])
    # right[b][n]: whether the teacher's region n predicts y_b (region 0 is the global prediction)
    right = [[True, True, False, True, False],
             [False, False, True, False, True],
             [False, True, False, False, False]]
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(3, k, n, generator=g)
    for b in range(3):
        for r in range(n):
            target = int(y[b]) if right[b][r] else (int(y[b]) + 1 + r % (k - 1)) % k
            zt[b, target, r] += 10.0
    assert ((zt.argmax(dim=1) == y[:, None]) == torch.tensor(right)).all()
    zs = torch.randn(3, k, n, generator=g) * 2
    for base in ("kd", "dkd"):
        rows = []
        for b in range(3):
            for r in range(n):
                if base == "kd":
                    rows.append(ref_kd_rows(zs[b, :, r][None], zt[b, :, r][None], 4.0)[0])
                else:
                    rows.append(ref_dkd_rows(zs[b, :, r][None], zt[b, :, r][None], [y[b]], 1.0, 8.0,
                                             4.0)[0])
        complementary = [right[b][r] != right[b][0] for b in range(3) for r in range(n)]
        assert sum(complementary) == 5  # (b, n) = (0, 2), (0, 4), (1, 2), (1, 4), (2, 1)
        for cw in (1.0, 2.0, 3.5):
            want = sum((cw if c else 1.0) * l for c, l in zip(complementary, rows)) / (3 * n)
            _close(sdd_loss(zs, zt, y, base=base, complementary_weight=cw), want, rtol=1e-5, atol=1e-6)


def test_sdd_teacher_8x8_student_4x4_and_n_mismatch():
    fmap_s = _feature_map(1, channels=4, size=4).requires_grad_()
    fmap_t = _feature_map(2, channels=6, size=8)
    fc_s, fc_t = nn.Linear(4, 10), nn.Linear(6, 10)
    y = torch.tensor([1, 2, 3])
    loss = sdd_loss(region_logits(fmap_s, fc_s), region_logits(fmap_t, fc_t).detach(), y,
                    standardize=True)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(fmap_s.grad).all() and fmap_s.grad.abs().sum() > 0
    assert torch.isfinite(fc_s.weight.grad).all()
    with pytest.raises(ValueError, match="N = 5 regions, teacher N = 21"):
        sdd_loss(region_logits(fmap_s, fc_s, (1, 2)), region_logits(fmap_t, fc_t), y)
    with pytest.raises(ValueError, match="base"):
        sdd_loss(region_logits(fmap_s, fc_s), region_logits(fmap_t, fc_t), y, base="crd")


def test_sdd_per_sample_beta_is_shared_by_regions():
    zs, zt, y = _regions(4, 3, 10, 5)
    beta = torch.tensor([0.5, 2.0, 7.0])
    got = sdd_loss(zs, zt, y, beta=beta, complementary_weight=1.0)
    rows = [ref_dkd_rows(zs[b, :, r][None], zt[b, :, r][None], [y[b]], 1.0, float(beta[b]), 4.0)[0]
            for b in range(3) for r in range(5)]
    _close(got, np.mean(rows), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


def _extreme_logits(k=10, batch=6):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(batch, k, generator=g) * 1e4
    zt = torch.randn(batch, k, generator=g) * 1e4
    y = torch.randint(0, k, (batch,), generator=g)
    # rows where p_y rounds to exactly 1 (teacher) or 0 (student), and the reverse
    zt[0] = -1e4
    zt[0, y[0]] = 1e4
    zs[1] = 1e4
    zs[1, y[1]] = -1e4
    zs[2] = -1e4
    zs[2, y[2]] = 1e4
    return zs, zt, y


@pytest.mark.parametrize("name", ["kd", "dkd", "kd+ls", "dkd+ls", "sdd", "sdd+ls"])
def test_gradients_finite_for_huge_logits(name):
    zs, zt, y = _extreme_logits()
    zs.requires_grad_()
    zt.requires_grad_()
    if name.startswith("sdd"):
        s, t = zs.reshape(3, 2, 10).transpose(1, 2), zt.reshape(3, 2, 10).transpose(1, 2)
        loss = sdd_loss(s, t, y[:3], standardize=name.endswith("+ls"))
    else:
        s, t = (standardize_logits(zs), standardize_logits(zt)) if name.endswith("+ls") else (zs, zt)
        loss = kd_loss(s, t) if name.startswith("kd") else dkd_loss(s, t, y)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(zs.grad).all() and torch.isfinite(zt.grad).all()
    assert zs.grad.abs().sum() > 0


def test_gradcheck_kd_dkd_standardize():
    zs, zt, y = _logits(0, 3, 5, dtype=torch.float64)
    zs.requires_grad_()
    zt.requires_grad_()
    beta = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, 2.0), (zs, zt))
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, 2.0, reduction="none"), (zs, zt))
    assert torch.autograd.gradcheck(lambda a, b: dkd_loss(a, b, y, 1.0, 8.0, 4.0), (zs, zt))
    assert torch.autograd.gradcheck(lambda a, b, c: dkd_loss(a, b, y, 2.0, c, 4.0, reduction="none"),
                                    (zs, zt, beta))
    assert torch.autograd.gradcheck(standardize_logits, (zs,))


@pytest.mark.parametrize("base", ("kd", "dkd"))
@pytest.mark.parametrize("standardize", (False, True))
def test_gradcheck_sdd(base, standardize):
    zs, zt, y = _regions(1, 2, 4, 5, dtype=torch.float64)
    zs.requires_grad_()
    zt.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: sdd_loss(a, b, y, base=base, standardize=standardize, temperature=2.0), (zs, zt))


# --------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,channels", [("resnet8", 64), ("resnet18", 512)])
def test_forward_feature_map_pooled_is_forward_features(arch, channels):
    torch.manual_seed(0)
    model = build_encoder(arch, 10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fmap = model.forward_feature_map(x)
        features = model.forward_features(x)
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, channels)
    assert (fmap >= 0).all()  # after the last ReLU
    assert torch.equal(F.adaptive_avg_pool2d(fmap, 1).flatten(1), features)
    regions = region_logits(fmap, model.fc, (1,))
    torch.testing.assert_close(regions[:, :, 0], model.fc(features), rtol=1e-6, atol=1e-6)
