"""Comparing two models (SPEC 16): representation similarity (CKA), prediction statistics and
mutual information. Pure functions of tensors or arrays, float64 where it matters.

CKA (Kornblith et al. 2019) of representations X (n x p) and Y (n x q) of the same n inputs:
    linear   CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), columns centred
    RBF      CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = tr(K H L H) / (n - 1)^2,
             K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), sigma = factor x median pairwise distance
    minibatch (Nguyen et al. 2021): the unbiased HSIC_1 of Song et al. (2012) of linear kernels,
             averaged over minibatches, CKA = mean HSIC_1(K, L) / sqrt(mean HSIC_1(K, K) mean HSIC_1(L, L))
Prediction statistics of two classifiers on the same labelled images: accuracies, agreement, the
2 x 2 error-overlap table, Cohen's kappa, the exact two-sided McNemar test.
Mutual information: the Kraskov-Stoegbauer-Grassberger estimator (algorithm 1, Chebyshev
distances, an exact chunked neighbour scan) between two continuous representations, and Ross's (2014) estimator between a
continuous representation and discrete labels; both biased in high dimension (report k and d).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import digamma
from scipy.stats import binom


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"representations must be (n, p) and (n, q) of the same n inputs, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


# ------------------------------------------------------------------------------------------------
# CKA
# ------------------------------------------------------------------------------------------------

def linear_cka(x, y) -> float:
    """||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with centred columns, in float64.

    The feature-space form costs n (p q + p^2 + q^2); the Gram form n^2 (p + q) is used when n is
    the smaller dimension (same value: ||X^T X||_F = ||X X^T||_F)."""
    x, y = _f64(x), _f64(y)
    _check_pair(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n * (p * q + p * p + q * q) <= n * n * (p + q):
        cross, xx, yy = (y.T @ x).square().sum(), (x.T @ x).norm(), (y.T @ y).norm()
    else:
        kx, ky = x @ x.T, y @ y.T
        cross, xx, yy = (kx * ky).sum(), kx.norm(), ky.norm()
    denom = xx * yy
    return float(cross / denom) if denom > 0 else math.nan


def median_distance(x) -> float:
    """The median Euclidean distance over distinct pairs of rows (the mean of the two middle ones
    for an even number of pairs)."""
    x = _f64(x)
    d = torch.cdist(x, x)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return float(np.median(d[i, j].numpy()))


def rbf_kernel(x, sigma_factor: float = 1.0) -> torch.Tensor:
    """exp(-||x_i - x_j||^2 / (2 sigma^2)), sigma = sigma_factor x the median pairwise distance."""
    x = _f64(x)
    sq = torch.cdist(x, x).square()
    sigma = sigma_factor * median_distance(x)
    if sigma <= 0:
        raise ValueError("every row is the same point: the RBF bandwidth (median distance) is 0")
    return torch.exp(-sq / (2 * sigma * sigma))


def _centred(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T / n."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """The biased HSIC tr(K H L H) / (n - 1)^2 of two kernel matrices."""
    n = k.shape[0]
    return float((_centred(k) * _centred(l)).sum() / (n - 1) ** 2)


def kernel_cka(k: torch.Tensor, l: torch.Tensor) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    k, l = _f64(k), _f64(l)
    kc, lc = _centred(k), _centred(l)
    denom = float(kc.norm() * lc.norm())
    return float((kc * lc).sum()) / denom if denom > 0 else math.nan


def rbf_cka(x, y, sigma_factor: float = 1.0) -> float:
    """CKA with Gaussian kernels, each at sigma_factor x its own median pairwise distance."""
    x, y = _f64(x), _f64(y)
    _check_pair(x, y)
    return kernel_cka(rbf_kernel(x, sigma_factor), rbf_kernel(y, sigma_factor))


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC_1 of two n x n kernel matrices (n > 3), diagonals ignored:
    [tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n - 1)(n - 2)) - 2 1^T K~ L~ 1 / (n - 2)] / (n (n - 3)),
    K~ = K with a zero diagonal."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples per minibatch, got {n}")
    k = k - torch.diag_embed(torch.diagonal(k))
    l = l - torch.diag_embed(torch.diagonal(l))
    trace = (k * l).sum()
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2 * (k.sum(0) * l.sum(0)).sum() / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


class MinibatchCKA:
    """Linear CKA between every layer of model A and every layer of model B, accumulated over
    minibatches (Nguyen et al. 2021): only one minibatch's activations are held at a time.

    `update(feats_a, feats_b)` takes the lists of (B, p_i) and (B, q_j) activations of one minibatch
    (the same B inputs); `result()` gives the (layers of A) x (layers of B) CKA matrix."""

    def __init__(self, n_a: int, n_b: int):
        self.cross = torch.zeros(n_a, n_b, dtype=torch.float64)
        self.self_a = torch.zeros(n_a, dtype=torch.float64)
        self.self_b = torch.zeros(n_b, dtype=torch.float64)
        self.batches = 0

    @staticmethod
    def _grams(feats) -> torch.Tensor:
        grams = []
        for f in feats:
            f = _f64(f).flatten(1)
            grams.append(f @ f.T)
        return torch.stack(grams)

    def update(self, feats_a, feats_b) -> None:
        ka, kb = self._grams(feats_a), self._grams(feats_b)
        for i in range(len(ka)):
            self.self_a[i] += unbiased_hsic(ka[i], ka[i])
            for j in range(len(kb)):
                self.cross[i, j] += unbiased_hsic(ka[i], kb[j])
        for j in range(len(kb)):
            self.self_b[j] += unbiased_hsic(kb[j], kb[j])
        self.batches += 1

    def result(self) -> torch.Tensor:
        if not self.batches:
            raise ValueError("no minibatch was accumulated")
        return self.cross / torch.sqrt(self.self_a[:, None] * self.self_b[None, :])


def unbiased_cka(x, y) -> float:
    """The unbiased linear CKA of the full sets (one minibatch of all n rows)."""
    acc = MinibatchCKA(1, 1)
    acc.update([x], [y])
    return float(acc.result()[0, 0])


# ------------------------------------------------------------------------------------------------
# Prediction statistics
# ------------------------------------------------------------------------------------------------

def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs b, c under Binomial(b + c, 1/2),
    p = min(1, 2 P(X <= min(b, c))); 1 when there is no discordant pair."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(only_a, only_b), n, 0.5)))


def error_overlap(pred_a, pred_b, labels) -> dict[str, int]:
    """The 2 x 2 table of right and wrong answers of two classifiers on the same images."""
    y = torch.as_tensor(labels).long().cpu()
    right_a = torch.as_tensor(pred_a).long().cpu() == y
    right_b = torch.as_tensor(pred_b).long().cpu() == y
    return {"both_right": int((right_a & right_b).sum()), "only_a_right": int((right_a & ~right_b).sum()),
            "only_b_right": int((~right_a & right_b).sum()), "both_wrong": int((~right_a & ~right_b).sum())}


def cohen_kappa(pred_a, pred_b, num_classes: int) -> float:
    """(p_o - p_e) / (1 - p_e): agreement beyond what the two prediction frequencies give by chance."""
    a, b = torch.as_tensor(pred_a).long().cpu(), torch.as_tensor(pred_b).long().cpu()
    p_o = float((a == b).double().mean())
    freq_a = torch.bincount(a, minlength=num_classes).double() / len(a)
    freq_b = torch.bincount(b, minlength=num_classes).double() / len(b)
    p_e = float((freq_a * freq_b).sum())
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan


def prediction_statistics(pred_a, pred_b, labels, class_names=None, top_classes: int = 10) -> dict:
    """Accuracies, agreement, the error-overlap counts, Cohen's kappa, McNemar and the classes where
    the two models' per-class accuracies differ most (accuracies in percent)."""
    a, b = torch.as_tensor(pred_a).long().cpu(), torch.as_tensor(pred_b).long().cpu()
    y = torch.as_tensor(labels).long().cpu()
    if not (a.shape == b.shape == y.shape) or a.ndim != 1:
        raise ValueError(f"predictions and labels must be three (n,) arrays, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(y.shape)}")
    num_classes = int(max(a.max(), b.max(), y.max())) + 1 if len(y) else 0
    if class_names is not None:
        num_classes = max(num_classes, len(class_names))
    right_a, right_b = a == y, b == y
    counts = error_overlap(a, b, y)
    per_class = []
    for c in torch.unique(y).tolist():
        mask = y == c
        acc_a, acc_b = 100 * float(right_a[mask].double().mean()), 100 * float(right_b[mask].double().mean())
        name = class_names[c] if class_names is not None else str(c)
        per_class.append({"class": name, "images": int(mask.sum()), "accuracy_a": acc_a, "accuracy_b": acc_b,
                          "difference": acc_a - acc_b})
    per_class.sort(key=lambda r: (-abs(r["difference"]), r["class"]))
    return {"n": len(y), "accuracy_a": 100 * float(right_a.double().mean()),
            "accuracy_b": 100 * float(right_b.double().mean()),
            "agreement": 100 * float((a == b).double().mean()), **counts,
            "kappa": cohen_kappa(a, b, num_classes),
            "mcnemar_p": mcnemar_exact(counts["only_a_right"], counts["only_b_right"]),
            "classes_differing_most": per_class[:top_classes]}


# ------------------------------------------------------------------------------------------------
# Mutual information
# ------------------------------------------------------------------------------------------------

def pca(x, d: int) -> np.ndarray:
    """The scores of the rows of x on its first d principal components (float64), d <= min(n, p):
    from the eigenvectors of the smaller of the covariance X^T X and the Gram matrix X X^T."""
    x = _f64(x)
    x = x - x.mean(0)
    n, p = x.shape
    d = min(d, n, p)
    if p <= n:
        _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
        return (x @ vectors[:, -d:].flip(1)).numpy()
    values, vectors = torch.linalg.eigh(x @ x.T)
    return (vectors[:, -d:].flip(1) * values[-d:].flip(0).clamp(min=0).sqrt()).numpy()


def _chebyshev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, p=float("inf"))


def _kth_neighbour_and_counts(joint: torch.Tensor, marginals: list[torch.Tensor], k: int,
                              chunk: int = 1024) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """eps_i, the Chebyshev distance of row i to its k-th nearest other row of `joint`, and for each
    marginal the number of other rows strictly closer than eps_i there. A chunked exact scan: in
    the 8 to 16 dimensions of these estimates it is faster than a KD-tree, which degrades to a
    scan with overhead at that dimension."""
    n = joint.shape[0]
    eps = torch.empty(n, dtype=torch.float64)
    counts = [torch.empty(n, dtype=torch.long) for _ in marginals]
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        d = _chebyshev(joint[rows], joint)
        d[torch.arange(len(rows)), rows] = math.inf  # not its own neighbour
        eps[rows] = d.topk(k, dim=1, largest=False).values[:, -1]
        for part, out in zip(marginals, counts):
            out[rows] = (_chebyshev(part[rows], part) < eps[rows, None]).sum(1) - 1  # minus itself
    return eps, counts


def ksg_mutual_information(x, y, k: int = 3) -> float:
    """Kraskov-Stoegbauer-Grassberger estimator, algorithm 1, in nats:
    I = psi(k) + psi(N) - < psi(n_x + 1) + psi(n_y + 1) >, with eps_i the Chebyshev distance of
    point i to its k-th neighbour in the joint space and n_x(i), n_y(i) the numbers of other points
    strictly closer than eps_i in each marginal space."""
    x, y = _f64(x), _f64(y)
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows, y {len(y)}")
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must lie in [1, {n - 1}], got {k}")
    _, (n_x, n_y) = _kth_neighbour_and_counts(torch.cat([x, y], 1), [x, y], k)
    return float(digamma(k) + digamma(n) - np.mean(digamma(n_x.numpy() + 1) + digamma(n_y.numpy() + 1)))


def mixed_mutual_information(x, labels, k: int = 3) -> float:
    """Ross's (2014) estimator of I(X; Y) for continuous X and discrete Y, in nats:
    I = psi(N) + <psi(k_i)> - <psi(N_{y_i})> - <psi(m_i + 1)>, with d_i the Chebyshev distance of
    point i to its k-th neighbour of the same label (k_i = min(k, N_y - 1)) and m_i the number of
    other points of any label strictly closer than d_i. Points whose label occurs once are left out."""
    x = _f64(x)
    x = x.reshape(len(x), -1)
    labels = torch.as_tensor(labels).cpu()
    if len(x) != len(labels):
        raise ValueError(f"x has {len(x)} rows but there are {len(labels)} labels")
    classes, inverse, size = torch.unique(labels, return_inverse=True, return_counts=True)
    keep = size[inverse] > 1
    if not keep.any():
        raise ValueError("every label occurs once: the mixed estimator needs repeated labels")
    x, inverse = x[keep], inverse[keep]
    radius = torch.empty(len(x), dtype=torch.float64)
    k_i = torch.empty(len(x), dtype=torch.long)
    for c in torch.unique(inverse).tolist():
        members = torch.nonzero(inverse == c).flatten()
        kc = min(k, len(members) - 1)
        radius[members], _ = _kth_neighbour_and_counts(x[members], [], kc)
        k_i[members] = kc
    m = torch.empty(len(x), dtype=torch.long)
    for start in range(0, len(x), 1024):
        rows = slice(start, start + 1024)
        m[rows] = (_chebyshev(x[rows], x) < radius[rows, None]).sum(1) - 1
    n_y = size[inverse].numpy()
    return float(digamma(len(x)) + np.mean(digamma(k_i.numpy())) - np.mean(digamma(n_y))
                 - np.mean(digamma(m.numpy() + 1)))
