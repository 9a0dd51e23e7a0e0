"""Representation metrics on L2-normalised embeddings (SPEC section 7).

Every function accepts torch tensors or numpy arrays, L2-normalises the embeddings itself and
computes in float64 with torch on the input's device (CPU for numpy input and for MPS, which has no
float64). All metrics are exact (every pair counted, no sampling):

- pairwise sums that have no closed form (uniformity) are taken over row blocks of `chunk_size`
  rows against the remaining columns, so 10,000 points need one (chunk_size x N) float64 block at a
  time (2048 x 10,000 x 8 B = 164 MB) instead of the full N x N matrix;
- pairwise means of squared distances within classes use the exact identity
      sum_{i<j in c} ||z_i - z_j||^2 = n_c * sum_{i in c} ||z_i - mu_c||^2
  (mu_c the class mean), which is O(N D), needs no pair matrix at all, and has no cancellation
  because it sums squares of centred vectors.

For unit vectors ||u - v||^2 = 2 - 2 u.v and the cosine distance is 1 - u.v = ||u - v||^2 / 2.

Undefined values (fewer than two points or classes, a zero variance correlation) are float("nan")
in the individual functions and None in `analyze_embeddings`, whose output is JSON-ready.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import numpy as np
import torch

log = logging.getLogger("desupcon")

DEFAULT_CHUNK_SIZE = 2048

# Semantically close and far class pairs whose centroid cosine similarity is reported (SPEC 7);
# pairs whose names are not among the dataset's classes are skipped.
DEFAULT_NAMED_PAIRS: tuple[tuple[str, str], ...] = (
    # CIFAR-100
    ("apple", "orange"), ("maple_tree", "oak_tree"), ("leopard", "tiger"),
    ("bus", "streetcar"), ("apple", "bus"),
    # CIFAR-10
    ("cat", "dog"), ("automobile", "truck"), ("airplane", "ship"), ("cat", "truck"),
)


# ----------------------------------------------------------------------------------------------
# Input helpers
# ----------------------------------------------------------------------------------------------

def _compute_device(x) -> torch.device:
    """The input's device, except MPS (no float64) and numpy, which compute on the CPU."""
    if torch.is_tensor(x) and x.device.type != "mps":
        return x.device
    return torch.device("cpu")


def as_float64(x, device: torch.device | None = None) -> torch.Tensor:
    """A detached float64 torch tensor from a tensor or array-like (no copy when already so)."""
    t = x.detach() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    return t.to(device=device or _compute_device(x), dtype=torch.float64)


def normalized(z, device: torch.device | None = None) -> torch.Tensor:
    """(N, D) float64 rows scaled to unit L2 norm; an all-zero row stays zero."""
    z = as_float64(z, device)
    if z.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {tuple(z.shape)}")
    return torch.nn.functional.normalize(z, dim=1)


def zero_vector_share(z) -> float:
    """Share of rows with no direction (zero or non-finite norm): alignment and uniformity are
    undefined on such embeddings (a dead network's pooled features are all zero)."""
    z = as_float64(z)
    if z.ndim != 2 or z.shape[0] == 0:
        return 0.0
    norms = z.norm(dim=1)
    return float(((norms == 0) | ~torch.isfinite(norms)).double().mean())


def degenerate_reason(z) -> str | None:
    """Why alignment and uniformity of `z` are NaN, or None when they are defined."""
    share = zero_vector_share(z)
    if share:
        n = z.shape[0]
        return f"{round(share * n)} of {n} embeddings are zero or non-finite vectors (no direction)"
    return None


def _labels(labels, n: int, device: torch.device) -> torch.Tensor:
    labels = labels.detach() if torch.is_tensor(labels) else torch.as_tensor(np.asarray(labels))
    labels = labels.to(device=device, dtype=torch.int64).reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"{n} embeddings but {labels.numel()} labels")
    return labels


def _float(x) -> float:
    return float(x.item() if torch.is_tensor(x) else x)


# ----------------------------------------------------------------------------------------------
# Alignment and uniformity (Wang & Isola, 2020)
# ----------------------------------------------------------------------------------------------

def _pair_logsumexp(z: torch.Tensor, t: float, chunk_size: int) -> tuple[torch.Tensor, int]:
    """log sum_{i<j} exp(-t ||z_i - z_j||^2) for unit rows z, and the number of pairs.

    Row block [a, b) is compared with columns [a, N) only (the upper triangle), the square part
    masked below and on the diagonal. Blocks are combined with a running maximum m and a running
    sum s = sum exp(x - m) over the entries x seen so far, rescaled whenever m grows, so large t
    never underflows to log(0).
    """
    n = z.shape[0]
    running_max = torch.tensor(-math.inf, dtype=torch.float64, device=z.device)
    running_sum = torch.zeros((), dtype=torch.float64, device=z.device)
    lower = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=z.device).tril_()
    shift = torch.tensor(-2 * t, dtype=torch.float64, device=z.device)
    for a in range(0, n - 1, chunk_size):
        b = min(a + chunk_size, n)
        # block = -t ||z_i - z_j||^2 = 2t z_i.z_j - 2t for rows i in [a, b), columns j >= a, in
        # one fused matmul; clamped to <= 0 because rounding can push z_i.z_i a hair above 1
        block = torch.addmm(shift, z[a:b], z[a:].T, alpha=2 * t).clamp_(max=0)
        block[:, : b - a].masked_fill_(lower[: b - a, : b - a], -math.inf)  # keep j > i only
        block_max = block.max()
        if block_max > running_max:
            running_sum = running_sum * torch.exp(running_max - block_max)
            running_max = block_max
        running_sum = running_sum + block.sub_(running_max).exp_().sum()
        del block  # free it before the next one is allocated: one block alive, not two
    return running_max + torch.log(running_sum), n * (n - 1) // 2


def uniformity(z, t: float = 2.0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Uniformity loss  log( 1/P sum_{i<j} exp(-t ||z_i - z_j||^2) ),  P = N(N-1)/2.

    Always <= 0; 0 when all points coincide, -4t for two antipodal points, lower is more uniform.
    NaN for fewer than two points and when any row has no direction (`degenerate_reason`).
    """
    if degenerate_reason(z):
        return math.nan
    z = normalized(z)
    if z.shape[0] < 2:
        return math.nan
    log_total, pairs = _pair_logsumexp(z, float(t), int(chunk_size))
    return _float(log_total) - math.log(pairs)


def _class_index(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted distinct labels, per-sample index into them, per-class counts)."""
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return classes, inverse, counts


def _class_means(z: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(C, D) mean of the rows of each class (unnormalised)."""
    sums = torch.zeros(len(counts), z.shape[1], dtype=z.dtype, device=z.device)
    sums.index_add_(0, inverse, z)
    return sums / counts.unsqueeze(1).to(z.dtype)


def _same_class_pair_stats(z: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(sum over same-class pairs i<j of ||z_i - z_j||^2, number of such pairs).

    Uses  sum_{i<j in c} ||z_i - z_j||^2 = n_c sum_{i in c} ||z_i - mu_c||^2  per class c.
    """
    _, inverse, counts = _class_index(labels)
    means = _class_means(z, inverse, counts)
    scatter = torch.zeros(len(counts), dtype=z.dtype, device=z.device)
    scatter.index_add_(0, inverse, (z - means[inverse]).square().sum(dim=1))
    counts = counts.to(z.dtype)
    total = (counts * scatter).sum()
    pairs = int((counts * (counts - 1) / 2).sum().item())
    return _float(total), pairs


def alignment_class(z, labels) -> float:
    """Class alignment  1/P sum_{i<j, y_i = y_j} ||z_i - z_j||^2  over all same-class pairs.

    All same-class pairs are pooled (a class of n samples weighs n(n-1)/2 pairs), which is the
    published definition, not the mean of per-class means. Classes with one sample contribute no
    pairs; with no same-class pair at all the result is 0.0 (nothing is misaligned). NaN when any
    row has no direction (`degenerate_reason`). Range [0, 4]; lower is better aligned.
    """
    if degenerate_reason(z):
        return math.nan
    z = normalized(z)
    total, pairs = _same_class_pair_stats(z, _labels(labels, z.shape[0], z.device))
    return total / pairs if pairs else 0.0


def alignment_instance(z1, z2) -> float:
    """Instance alignment  1/N sum_i ||z1_i - z2_i||^2  for two augmented views of each image;
    NaN when any row of either view has no direction."""
    if degenerate_reason(z1) or degenerate_reason(z2):
        return math.nan
    z1 = normalized(z1)
    z2 = normalized(z2, z1.device)
    if z1.shape != z2.shape:
        raise ValueError(f"the two views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    if z1.shape[0] == 0:
        return math.nan
    return _float((z1 - z2).square().sum(dim=1).mean())


# ----------------------------------------------------------------------------------------------
# Class geometry
# ----------------------------------------------------------------------------------------------

def _unit_centroids(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct labels, (C, D) L2-normalised class means of the unit rows z)."""
    classes, inverse, counts = _class_index(labels)
    return classes, torch.nn.functional.normalize(_class_means(z, inverse, counts), dim=1)


def _upper(m: torch.Tensor) -> torch.Tensor:
    """The entries above the diagonal of a square matrix, row by row."""
    i, j = torch.triu_indices(m.shape[0], m.shape[1], offset=1, device=m.device)
    return m[i, j]


def class_distances(z, labels) -> dict[str, float]:
    """Intra- and inter-class distances and their ratio.

    intra_sq   mean ||z_i - z_j||^2 over same-class pairs (= alignment_class)
    intra_cos  mean (1 - cos(z_i, z_j)) over the same pairs (= intra_sq / 2 for unit vectors)
    inter_sq   mean ||c_a - c_b||^2 over distinct class pairs a<b, c = L2-normalised class mean
    inter_cos  mean (1 - cos(c_a, c_b)) over the same class pairs
    separation_ratio = inter_cos / intra_cos (higher: classes further apart than they are wide)
    Inter values are NaN with fewer than two classes, the ratio NaN when intra_cos is 0.
    """
    z = normalized(z)
    labels = _labels(labels, z.shape[0], z.device)
    intra_sq = alignment_class(z, labels)
    intra_cos = intra_sq / 2
    _, centroids = _unit_centroids(z, labels)
    if len(centroids) >= 2:
        cos = _upper(centroids @ centroids.T)
        inter_cos = _float((1 - cos).mean())
        inter_sq = _float((2 - 2 * cos).mean())
    else:
        inter_cos = inter_sq = math.nan
    ratio = inter_cos / intra_cos if intra_cos > 0 else math.nan
    return {"intra_sq": intra_sq, "intra_cos": intra_cos, "inter_sq": inter_sq,
            "inter_cos": inter_cos, "separation_ratio": ratio}


def centroid_similarities(z, labels, num_classes: int | None = None) -> np.ndarray:
    """(C, C) cosine similarities cos(c_a, c_b) of the L2-normalised class means, as numpy.

    Row/column k is label k, C = num_classes or max(label) + 1; classes without samples are NaN.
    """
    z = normalized(z)
    labels = _labels(labels, z.shape[0], z.device)
    classes, centroids = _unit_centroids(z, labels)
    idx = classes.cpu().numpy()
    size = num_classes if num_classes is not None else int(idx.max()) + 1 if len(idx) else 0
    if len(idx) and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"labels must lie in [0, {size}), got [{idx.min()}, {idx.max()}]")
    sims = np.full((size, size), np.nan)
    sims[np.ix_(idx, idx)] = (centroids @ centroids.T).cpu().numpy()
    return sims


def named_pair_similarities(z, labels, class_names: Sequence[str],
                            pairs: Iterable[tuple[str, str]] = DEFAULT_NAMED_PAIRS) -> dict[str, float]:
    """{"a|b": cos(c_a, c_b)} for the named class pairs whose both classes have samples."""
    sims = centroid_similarities(z, labels, num_classes=len(class_names))
    index = {name: k for k, name in enumerate(class_names)}
    out = {}
    for a, b in pairs:
        if a in index and b in index and np.isfinite(sims[index[a], index[b]]):
            out[f"{a}|{b}"] = float(sims[index[a], index[b]])
    return out


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN with fewer than two values or zero variance."""
    if len(x) < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denom if denom > 0 else math.nan


def _fine_to_coarse(labels: np.ndarray, coarse: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The superclass of each class in `classes`; a class split across superclasses is an error."""
    out = np.empty(len(classes), dtype=np.int64)
    for k, c in enumerate(classes):
        supers = np.unique(coarse[labels == c])
        if len(supers) != 1:
            raise ValueError(f"class {int(c)} maps to several superclasses {supers.tolist()}")
        out[k] = supers[0]
    return out


def _superclass_margin(sims: np.ndarray, same_super: np.ndarray) -> float:
    """mean cos over same-superclass class pairs minus mean cos over cross-superclass pairs."""
    if not same_super.any() or same_super.all():
        return math.nan
    return float(sims[same_super].mean() - sims[~same_super].mean())


def superclass_structure(z, labels, coarse_labels) -> dict[str, float]:
    """Whether classes of one superclass sit together (SPEC 16; CIFAR-100's 20 coarse labels).

    From the L2-normalised class centroids c_a of the unit rows of z:
    superclass_margin        mean cos(c_a, c_b) over pairs a<b in one superclass minus the mean over
                             pairs across superclasses (NaN when either set of pairs is empty)
    superclass_nearest_rate  fraction of classes whose nearest other centroid (largest cosine) is in
                             their own superclass (CIFAR-100 by chance: 4/99)
    A class whose samples carry several superclass ids is an error.
    """
    z = normalized(z)
    labels = _labels(labels, z.shape[0], z.device)
    coarse = _labels(coarse_labels, z.shape[0], z.device).cpu().numpy()
    classes, centroids = _unit_centroids(z, labels)
    supers = torch.from_numpy(_fine_to_coarse(labels.cpu().numpy(), coarse, classes.cpu().numpy()))
    sims = centroids @ centroids.T
    same = (supers[:, None] == supers[None, :]).to(sims.device)
    margin = _superclass_margin(_upper(sims).cpu().numpy(), _upper(same).cpu().numpy())
    if len(classes) < 2:
        return {"superclass_margin": margin, "superclass_nearest_rate": math.nan}
    others = sims.clone().fill_diagonal_(-math.inf)
    nearest = others.argmax(dim=1)
    rate = _float(same[torch.arange(len(classes), device=sims.device), nearest].double().mean())
    return {"superclass_margin": margin, "superclass_nearest_rate": rate}


def semantic_agreement(student_z, teacher_z, labels, coarse_labels=None) -> dict[str, float]:
    """How well the student reproduces the teacher's class-similarity structure.

    agreement_pearson   Pearson r between the student's and teacher's centroid cosine
                        similarities cos(c_a, c_b) over class pairs a<b (both models' centroids
                        from the same samples; the embedding dimensions may differ)
    With per-sample superclass ids `coarse_labels`, also for each model
    <model>_superclass_margin = mean cos over pairs in one superclass - mean cos across superclasses.
    """
    s = normalized(student_z)
    t = normalized(teacher_z, s.device)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student has {s.shape[0]} embeddings, teacher {t.shape[0]}")
    labels = _labels(labels, s.shape[0], s.device)
    classes, s_cent = _unit_centroids(s, labels)
    _, t_cent = _unit_centroids(t, labels)
    s_sims = _upper(s_cent @ s_cent.T).cpu().numpy()
    t_sims = _upper(t_cent @ t_cent.T).cpu().numpy()
    out = {"agreement_pearson": _pearson(s_sims, t_sims)}
    if coarse_labels is not None:
        coarse = _labels(coarse_labels, s.shape[0], s.device).cpu().numpy()
        supers = _fine_to_coarse(labels.cpu().numpy(), coarse, classes.cpu().numpy())
        same = _upper(torch.from_numpy(supers[:, None] == supers[None, :])).numpy()
        out["student_superclass_margin"] = _superclass_margin(s_sims, same)
        out["teacher_superclass_margin"] = _superclass_margin(t_sims, same)
    return out


# ----------------------------------------------------------------------------------------------
# Everything at once, JSON-ready
# ----------------------------------------------------------------------------------------------

def _json_float(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def analyze_embeddings(z, labels, class_names: Sequence[str] | None = None, coarse_labels=None,
                       z_view2=None, teacher_z=None,
                       named_pairs: Iterable[tuple[str, str]] | None = None) -> dict:
    """All section-7 metrics of one model's test embeddings as a flat dict of floats or None.

    Keys: alignment_class, uniformity (t = 2), zero_vectors (`zero_vector_share`: with any, alignment
    and uniformity are None), intra_sq, intra_cos, inter_sq, inter_cos,
    separation_ratio; alignment_instance when `z_view2` (second view of the same images) is given;
    semantic_agreement_pearson (+ semantic_student_superclass_margin and
    semantic_teacher_superclass_margin with `coarse_labels`) when `teacher_z` is given;
    superclass_margin and superclass_nearest_rate (`superclass_structure`) with `coarse_labels`;
    centroid_pairs = {"a|b": cos} when `named_pairs` and `class_names` are given.
    Undefined values are None, never NaN, so the dict can be written as strict JSON.
    """
    reason = degenerate_reason(z)
    if reason:
        log.warning(f"alignment and uniformity are undefined (None): {reason}")
    zero_share = zero_vector_share(z)
    z = normalized(z)
    labels = _labels(labels, z.shape[0], z.device)
    out: dict = {"alignment_class": alignment_class(z, labels), "uniformity": uniformity(z),
                 "zero_vectors": zero_share}
    if z_view2 is not None:
        out["alignment_instance"] = alignment_instance(z, z_view2)
    out.update(class_distances(z, labels))
    if coarse_labels is not None:
        out.update(superclass_structure(z, labels, coarse_labels))
    if teacher_z is not None:
        sem = semantic_agreement(z, teacher_z, labels, coarse_labels)
        out.update({f"semantic_{k}": v for k, v in sem.items()})
    out = {k: _json_float(v) for k, v in out.items()}
    if named_pairs is not None and class_names is not None:
        pairs = named_pair_similarities(z, labels, class_names, named_pairs)
        out["centroid_pairs"] = {k: _json_float(v) for k, v in pairs.items()}
    return out
