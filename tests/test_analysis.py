"""Tests of desupcon.analysis.metrics (SPEC section 7).

Each metric is compared with a naive float64 evaluation of its formula written as explicit Python
loops over points and pairs (math only, never the torch path), on small random inputs that include
a class with a single sample. Then closed forms, chunking, input types, invariances, bounds and one
10,000-point run.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from desupcon.analysis import metrics as A

RTOL = 1e-9  # the implementation computes in float64 too; only the summation order differs


# --------------------------------------------------------------------------------------
# Naive float64 references
# --------------------------------------------------------------------------------------


def _unit_rows(x):
    """List of float64 unit vectors (plain Python lists) from an array or tensor."""
    x = x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, np.float64)
    rows = []
    for row in x:
        norm = math.sqrt(sum(v * v for v in row))
        rows.append([v / norm for v in row])
    return rows


def _sq(u, v):
    return sum((a - b) ** 2 for a, b in zip(u, v))


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def naive_uniformity(z, t=2.0):
    z = _unit_rows(z)
    terms = [math.exp(-t * _sq(z[i], z[j])) for i, j in itertools.combinations(range(len(z)), 2)]
    return math.log(sum(terms) / len(terms))


def naive_alignment_class(z, labels):
    z = _unit_rows(z)
    d = [_sq(z[i], z[j]) for i, j in itertools.combinations(range(len(z)), 2) if labels[i] == labels[j]]
    return sum(d) / len(d) if d else 0.0


def naive_alignment_instance(z1, z2):
    z1, z2 = _unit_rows(z1), _unit_rows(z2)
    return sum(_sq(u, v) for u, v in zip(z1, z2)) / len(z1)


def naive_centroids(z, labels):
    """{label: unit-norm class mean} in float64."""
    z = _unit_rows(z)
    out = {}
    for c in sorted(set(labels)):
        members = [z[i] for i in range(len(z)) if labels[i] == c]
        mean = [sum(col) / len(members) for col in zip(*members)]
        norm = math.sqrt(_dot(mean, mean))
        out[c] = [m / norm for m in mean]
    return out


def naive_class_distances(z, labels):
    zs = _unit_rows(z)
    same = [(i, j) for i, j in itertools.combinations(range(len(zs)), 2) if labels[i] == labels[j]]
    intra_cos = sum(1 - _dot(zs[i], zs[j]) for i, j in same) / len(same)
    cent = naive_centroids(z, labels)
    pairs = list(itertools.combinations(sorted(cent), 2))
    inter_sq = sum(_sq(cent[a], cent[b]) for a, b in pairs) / len(pairs)
    inter_cos = sum(1 - _dot(cent[a], cent[b]) for a, b in pairs) / len(pairs)
    return {"intra_sq": naive_alignment_class(z, labels), "intra_cos": intra_cos,
            "inter_sq": inter_sq, "inter_cos": inter_cos, "separation_ratio": inter_cos / intra_cos}


def naive_pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def naive_semantic(zs, zt, labels, coarse):
    cs, ct = naive_centroids(zs, labels), naive_centroids(zt, labels)
    pairs = list(itertools.combinations(sorted(cs), 2))
    s = [_dot(cs[a], cs[b]) for a, b in pairs]
    t = [_dot(ct[a], ct[b]) for a, b in pairs]
    sup = {labels[i]: coarse[i] for i in range(len(labels))}
    same = [sup[a] == sup[b] for a, b in pairs]

    def margin(sims):
        inside = [v for v, m in zip(sims, same) if m]
        across = [v for v, m in zip(sims, same) if not m]
        return sum(inside) / len(inside) - sum(across) / len(across)

    return {"agreement_pearson": naive_pearson(s, t),
            "student_superclass_margin": margin(s), "teacher_superclass_margin": margin(t)}


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture
def sample():
    """40 points in 8-D, 6 classes of uneven sizes including one singleton (class 5)."""
    g = torch.Generator().manual_seed(0)
    labels = [0] * 10 + [1] * 9 + [2] * 8 + [3] * 7 + [4] * 5 + [5]
    z = torch.randn(len(labels), 8, generator=g) * 2 + 0.5  # not unit norm: normalised inside
    z[torch.tensor(labels) == 1] += 2.0  # some class structure so the metrics are not all ~2
    return z, labels


# --------------------------------------------------------------------------------------
# Against the naive references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.5, 2.0, 10.0])
def test_uniformity_matches_naive(sample, t):
    z, _ = sample
    assert A.uniformity(z, t=t) == pytest.approx(naive_uniformity(z, t), rel=RTOL)


def test_alignment_class_matches_naive(sample):
    z, labels = sample
    assert A.alignment_class(z, labels) == pytest.approx(naive_alignment_class(z, labels), rel=RTOL)


def test_alignment_class_pools_pairs_not_class_means():
    # class 0: 3 identical points (3 pairs at distance 0); class 1: 2 antipodal points (1 pair, 4)
    z = np.array([[1.0, 0], [1, 0], [1, 0], [0, 1], [0, -1]])
    labels = [0, 0, 0, 1, 1]
    assert A.alignment_class(z, labels) == pytest.approx(4 / 4)  # pooled; mean of means would be 2


def test_alignment_class_without_pairs_is_zero():
    z = torch.randn(5, 4)
    assert A.alignment_class(z, [0, 1, 2, 3, 4]) == 0.0


def test_alignment_instance_matches_naive(sample):
    z, _ = sample
    z2 = z + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    assert A.alignment_instance(z, z2) == pytest.approx(naive_alignment_instance(z, z2), rel=RTOL)


def test_class_distances_match_naive(sample):
    z, labels = sample
    got, want = A.class_distances(z, labels), naive_class_distances(z, labels)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=RTOL), key


def test_centroid_similarities_and_named_pairs(sample):
    z, labels = sample
    cent = naive_centroids(z, labels)
    sims = A.centroid_similarities(z, labels)
    assert sims.shape == (6, 6)
    for a, b in itertools.product(range(6), repeat=2):
        assert sims[a, b] == pytest.approx(_dot(cent[a], cent[b]), rel=RTOL, abs=1e-12)
    # absent classes (6, 7) are NaN rows; pairs with unknown names or absent classes are skipped
    names = ["apple", "orange", "bus", "streetcar", "cat", "dog", "tiger", "leopard"]
    assert np.isnan(A.centroid_similarities(z, labels, num_classes=8)[6]).all()
    pairs = A.named_pair_similarities(z, labels, names, [("apple", "orange"), ("bus", "dog"),
                                                         ("leopard", "tiger"), ("zebra", "cat")])
    assert pairs.keys() == {"apple|orange", "bus|dog"}
    assert pairs["bus|dog"] == pytest.approx(_dot(cent[2], cent[5]), rel=RTOL)


def test_semantic_agreement_matches_naive(sample):
    zs, labels = sample
    zt = torch.randn(len(labels), 5, generator=torch.Generator().manual_seed(2))  # other dimension
    coarse = [{0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}[c] for c in labels]
    got, want = A.semantic_agreement(zs, zt, labels, coarse), naive_semantic(zs, zt, labels, coarse)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-8), key
    assert A.semantic_agreement(zs, zs, labels)["agreement_pearson"] == pytest.approx(1.0)


def test_semantic_agreement_rejects_split_superclass(sample):
    zs, labels = sample
    coarse = list(range(len(labels)))  # every sample its own superclass: classes are split
    with pytest.raises(ValueError, match="several superclasses"):
        A.semantic_agreement(zs, zs, labels, coarse)


# --------------------------------------------------------------------------------------
# Closed forms, chunking, input types, invariances, bounds
# --------------------------------------------------------------------------------------


def test_identical_points():
    z = np.tile([[0.3, -1.2, 2.0]], (7, 1))
    assert A.uniformity(z) == pytest.approx(0.0, abs=1e-12)
    assert A.alignment_class(z, [0] * 7) == pytest.approx(0.0, abs=1e-12)


def test_two_antipodal_points():
    z = np.array([[0.0, 2.0], [0.0, -5.0]])
    assert A.uniformity(z) == pytest.approx(-8.0, rel=1e-12)
    assert A.uniformity(z, t=1.0) == pytest.approx(-4.0, rel=1e-12)
    assert A.alignment_class(z, [0, 0]) == pytest.approx(4.0, rel=1e-12)


def test_large_t_does_not_underflow():
    # exp(-1000 * d) underflows to 0 in float64 for d > 0.75; the log-sum-exp must not
    z = torch.randn(30, 4, generator=torch.Generator().manual_seed(3))
    got = A.uniformity(z, t=1000.0)
    assert math.isfinite(got)
    zs = _unit_rows(z)
    d_min = min(_sq(zs[i], zs[j]) for i, j in itertools.combinations(range(30), 2))
    assert got == pytest.approx(-1000.0 * d_min - math.log(30 * 29 / 2), rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_chunking_does_not_change_uniformity(chunk):
    z = torch.randn(37, 6, generator=torch.Generator().manual_seed(4))
    assert A.uniformity(z, chunk_size=chunk) == pytest.approx(A.uniformity(z, chunk_size=4096), rel=1e-12)


def test_torch_and_numpy_inputs_agree(sample):
    z, labels = sample
    zt, zn = z.float(), z.float().numpy()
    lt, ln = torch.tensor(labels), np.array(labels)
    assert A.analyze_embeddings(zt, lt, teacher_z=zt * 2, z_view2=zt + 1) == \
        A.analyze_embeddings(zn, ln, teacher_z=zn * 2, z_view2=zn + 1)


def test_permutation_invariance(sample):
    z, labels = sample
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))
    zp, lp = z[perm], [labels[i] for i in perm.tolist()]
    a, b = A.analyze_embeddings(z, labels), A.analyze_embeddings(zp, lp)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-10), key


def test_bounds(sample):
    z, labels = sample
    for seed in range(3):
        zz = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        assert A.uniformity(zz) <= 0
        assert 0 <= A.alignment_class(zz, labels) <= 4
        assert A.class_distances(zz, labels)["separation_ratio"] > 0


def test_analyze_embeddings_is_json_ready(sample):
    import json

    z, labels = sample
    names = ["apple", "orange", "bus", "streetcar", "cat", "dog"]
    out = A.analyze_embeddings(z, labels, class_names=names, coarse_labels=[c // 2 for c in labels],
                               z_view2=z + 0.1, teacher_z=z.flip(1), named_pairs=A.DEFAULT_NAMED_PAIRS)
    assert set(out) == {"alignment_class", "uniformity", "alignment_instance", "intra_sq", "intra_cos",
                        "inter_sq", "inter_cos", "separation_ratio", "semantic_agreement_pearson",
                        "semantic_student_superclass_margin", "semantic_teacher_superclass_margin",
                        "superclass_margin", "superclass_nearest_rate", "centroid_pairs", "zero_vectors"}
    assert set(out["centroid_pairs"]) == {"apple|orange", "bus|streetcar", "apple|bus", "cat|dog"}
    assert all(type(v) is float for k, v in out.items() if k != "centroid_pairs")
    json.dumps(out, allow_nan=False)
    # one class only: inter distances and the ratio are undefined -> None, not NaN
    single = A.analyze_embeddings(z, [0] * len(labels))
    assert single["inter_cos"] is None and single["separation_ratio"] is None
    json.dumps(single, allow_nan=False)


def naive_superclass_structure(z, labels, coarse):
    """Float64 loops over classes and class pairs."""
    cents = naive_centroids(z, labels)
    sup = {labels[i]: coarse[i] for i in range(len(labels))}
    classes = sorted(cents)
    inside, across = [], []
    for a, b in itertools.combinations(classes, 2):
        (inside if sup[a] == sup[b] else across).append(_dot(cents[a], cents[b]))
    hits = 0
    for a in classes:
        best, best_sim = None, -math.inf
        for b in classes:
            if b != a and _dot(cents[a], cents[b]) > best_sim:
                best, best_sim = b, _dot(cents[a], cents[b])
        hits += sup[best] == sup[a]
    return {"superclass_margin": sum(inside) / len(inside) - sum(across) / len(across),
            "superclass_nearest_rate": hits / len(classes)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_superclass_structure_matches_a_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 12, (300,), generator=g).tolist()
    coarse_of = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    # superclass directions plus class offsets plus noise: some structure, not perfect
    super_dir = torch.randn(4, 16, generator=g, dtype=torch.float64)
    class_dir = torch.randn(12, 16, generator=g, dtype=torch.float64)
    z = (super_dir[[coarse_of[c] for c in labels]] + 1.5 * class_dir[labels]
         + torch.randn(300, 16, generator=g, dtype=torch.float64))
    coarse = [coarse_of[c] for c in labels]
    got = A.superclass_structure(z, labels, coarse)
    unit = [list(map(float, row / row.norm())) for row in z]
    want = naive_superclass_structure(unit, labels, coarse)
    assert got["superclass_margin"] == pytest.approx(want["superclass_margin"], abs=1e-5)
    assert got["superclass_nearest_rate"] == pytest.approx(want["superclass_nearest_rate"], abs=1e-12)


def test_superclass_structure_closed_forms():
    # classes 0, 1 share a direction, 2, 3 share the opposite one: the nearest centroid is always
    # in the superclass; margin = cos 1 - cos(-1) = 2
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    out = A.superclass_structure(z, [0, 1, 2, 3], [0, 0, 1, 1])
    assert out == {"superclass_margin": pytest.approx(2.0), "superclass_nearest_rate": 1.0}
    # swapping the superclasses: every nearest centroid lies in the other one
    out = A.superclass_structure(z, [0, 1, 2, 3], [0, 1, 0, 1])
    assert out["superclass_nearest_rate"] == 0.0 and out["superclass_margin"] == pytest.approx(-1.0)  # same: (-1, -1); across: (1, -1, -1, 1)
    with pytest.raises(ValueError, match="several superclasses"):
        A.superclass_structure(z, [0, 0, 1, 1], [0, 1, 1, 1])


def test_ten_thousand_points():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(10_000, 64, generator=g)
    labels = torch.randint(0, 100, (10_000,), generator=g)
    u = A.uniformity(z)
    # random directions in 64-D: ||u-v||^2 concentrates at 2, so uniformity is close to -4
    assert -4.0 < u < -3.8
    assert A.alignment_class(z, labels) == pytest.approx(2.0, abs=0.01)
    # the chunked result equals the one-block result
    assert A.uniformity(z[:3000], chunk_size=512) == pytest.approx(A.uniformity(z[:3000], chunk_size=3000),
                                                                  rel=1e-12)
