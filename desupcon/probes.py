"""Probes on frozen features (SPEC section 12).

Accuracies are percentages (0-100) as Python floats. Class rankings are stable: among equal scores
the lower class index ranks first, so predictions and top-k hits are deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_accuracy", "topk_accuracy"]


def _ranked_classes(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(n, min(k, C)) class indices by decreasing score, ties toward the lower class index."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :min(k, scores.shape[1])]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top<k>": percent of rows whose label is among the k highest scores} for each k in ks.

    Ties rank the lower class index first; k larger than the number of classes counts every row.
    """
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy: no samples")
    ranked = _ranked_classes(logits, max(ks))
    hits = ranked == labels.to(ranked.device).long()[:, None]
    return {f"top{k}": float(hits[:, :k].any(dim=1).float().mean()) * 100.0 for k in ks}


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                test_features: torch.Tensor, k: int = 20, num_classes: int | None = None,
                chunk_size: int = 512, weighting: str = "uniform") -> torch.Tensor:
    """(n_test, C) k-nearest-neighbour class scores on cosine similarity.

    Features are L2-normalised; each test sample's k most similar training samples vote for their
    own class. weighting="uniform" (default): an unweighted majority vote, every neighbour adds 1,
    so the scores are vote counts. weighting="similarity": a neighbour adds its cosine similarity.
    The prediction is the top-scoring class with ties toward the lower class index
    (`topk_accuracy` ranks that way). Neighbours tied in similarity at the k-th place are chosen by
    torch.topk. The test set is processed chunk_size rows at a time (memory chunk_size x n_train);
    num_classes defaults to max(train_labels) + 1. All tensors must be on one device.
    """
    if weighting not in ("uniform", "similarity"):
        raise ValueError(f"knn_predict: weighting must be 'uniform' or 'similarity', got {weighting!r}")
    n_train = train_features.shape[0]
    if not 1 <= k <= n_train:
        raise ValueError(f"knn_predict: k must be in [1, {n_train}] (training samples), got {k}")
    train_labels = train_labels.long()
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    test = F.normalize(test_features.to(dtype), dim=1)
    scores = torch.zeros(test.shape[0], num_classes, dtype=dtype, device=test.device)
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start:start + chunk_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.ones_like(top_sim) if weighting == "uniform" else top_sim
        scores[start:start + chunk_size].scatter_add_(1, train_labels[top_idx], votes)
    return scores


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
                 num_classes: int | None = None, chunk_size: int = 512,
                 weighting: str = "uniform") -> dict[str, float]:
    """{"top1": %, "top5": %} of the k-NN vote scores of `knn_predict` against test_labels."""
    scores = knn_predict(train_features, train_labels, test_features, k=k, num_classes=num_classes,
                         chunk_size=chunk_size, weighting=weighting)
    return topk_accuracy(scores, test_labels, ks=(1, 5))
