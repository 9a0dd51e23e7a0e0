"""Tests of the pure functions of desupcon.probes (SPEC section 12): k-NN and top-k accuracy.

References are naive Python loops; class ties rank the lower class index first.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from desupcon.probes import knn_accuracy, knn_predict, topk_accuracy


def _ranking(row):
    """Class indices by decreasing score, ties toward the lower index (explicit sort key)."""
    return sorted(range(len(row)), key=lambda c: (-row[c], c))


def _naive_knn_scores(train, train_labels, test, k, num_classes, weighting):
    train, test = train.double().tolist(), test.double().tolist()
    labels = [int(y) for y in train_labels]

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    train = [unit(v) for v in train]
    out = []
    for q in test:
        q = unit(q)
        sims = [(sum(a * b for a, b in zip(q, v)), j) for j, v in enumerate(train)]
        sims.sort(key=lambda p: -p[0])
        row = [0.0] * num_classes
        for sim, j in sims[:k]:
            row[labels[j]] += 1.0 if weighting == "uniform" else sim
        out.append(row)
    return out


def _naive_topk(scores, labels, ks):
    hits = {k: 0 for k in ks}
    for row, y in zip(scores, labels):
        ranked = _ranking(row)
        for k in ks:
            hits[k] += int(int(y) in ranked[:k])
    return {f"top{k}": 100.0 * hits[k] / len(scores) for k in ks}


def _data(seed, n_train=60, n_test=25, dim=8, classes=6):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g)
    test = torch.randn(n_test, dim, generator=g)
    train_labels = torch.randint(0, classes, (n_train,), generator=g)
    test_labels = torch.randint(0, classes, (n_test,), generator=g)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("weighting", ["uniform", "similarity"])
def test_knn_matches_naive_loop(weighting):
    ties = 0
    for seed in range(4):
        train, train_labels, test, test_labels = _data(seed)
        for k in (1, 4, 7, 20):
            want = _naive_knn_scores(train, train_labels, test, k, 6, weighting)
            got = knn_predict(train, train_labels, test, k=k, num_classes=6, chunk_size=7,
                              weighting=weighting)
            assert got.shape == (25, 6)
            torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32),
                                       rtol=1e-5, atol=1e-5)
            acc = knn_accuracy(train, train_labels, test, test_labels, k=k, num_classes=6,
                               weighting=weighting)
            ref = _naive_topk(want, test_labels, (1, 5))
            assert acc == pytest.approx(ref)
            ties += sum(sorted(row)[-1] == sorted(row)[-2] for row in want)
    if weighting == "uniform":
        assert ties > 20  # the tie-breaking rule was exercised


def test_knn_prediction_breaks_ties_toward_lower_class():
    # query equidistant from one sample of class 2 and one of class 1: a 1-1 vote, class 1 wins
    train = torch.tensor([[1.0, 0.2], [1.0, -0.2], [-1.0, 0.0]])
    labels = torch.tensor([2, 1, 0])
    scores = knn_predict(train, labels, torch.tensor([[1.0, 0.0]]), k=2)
    assert scores.tolist() == [[0.0, 1.0, 1.0]]
    assert topk_accuracy(scores, torch.tensor([1]), ks=(1,)) == {"top1": 100.0}
    assert topk_accuracy(scores, torch.tensor([2]), ks=(1, 2)) == {"top1": 0.0, "top2": 100.0}


def test_knn_one_hot_features_are_perfect():
    g = torch.Generator().manual_seed(0)
    train_labels = torch.arange(8).repeat_interleave(25)[torch.randperm(200, generator=g)]
    test_labels = torch.randint(0, 8, (40,), generator=g)
    acc = knn_accuracy(F.one_hot(train_labels, 8).float(), train_labels,
                       F.one_hot(test_labels, 8).float(), test_labels, k=20)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_knn_chunking_does_not_change_scores():
    train, train_labels, test, _ = _data(9, n_test=50)
    for weighting in ("uniform", "similarity"):
        whole = knn_predict(train, train_labels, test, k=5, chunk_size=1000, weighting=weighting)
        for chunk in (1, 3, 16):
            # matmul blocking differs per chunk shape: similarities may differ in the last bit
            torch.testing.assert_close(knn_predict(train, train_labels, test, k=5, chunk_size=chunk,
                                                   weighting=weighting), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_accuracy_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (200,), generator=g)
    for logits in (torch.randn(200, 10, generator=g),
                   torch.randint(0, 3, (200, 10), generator=g).float()):  # many ties
        got = topk_accuracy(logits, labels, ks=(1, 2, 5))
        assert got == pytest.approx(_naive_topk(logits.tolist(), labels, (1, 2, 5)))


def test_topk_more_than_classes_counts_everything():
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(1))
    assert topk_accuracy(logits, labels)["top5"] == 100.0


def test_knn_rejects_bad_arguments():
    train, train_labels, test, _ = _data(0)
    with pytest.raises(ValueError, match="weighting"):
        knn_predict(train, train_labels, test, weighting="distance")
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(train, train_labels, test, k=61)
