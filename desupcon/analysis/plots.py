"""Pictures of a trained model's embeddings and of training runs (SPEC section 7).

Each function renders one figure in memory and writes it with a single atomic write
(`checkpoint.atomic_write_bytes`), so a crash never leaves half a PNG, and returns the file's path.

Matplotlib figures are built with `matplotlib.figure.Figure`, which renders through the Agg canvas
without pyplot: no GUI backend is ever touched, no global figure list leaks memory over a long
sweep, and a caller's own pyplot backend is left alone. The 3-D hypersphere is a Plotly HTML page
that loads `plotly.min.js` from its own folder, so it works offline and the 4.5 MB library is
stored once per folder instead of once per plot.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from desupcon.analysis.metrics import normalized
from desupcon.store.checkpoint import atomic_write_bytes, atomic_write_text

PLOTLY_BUNDLE = "plotly.min.js"
HYPERSPHERE_DIV_ID = "hypersphere"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _unit_numpy(z) -> np.ndarray:
    """(N, D) float64 numpy array of L2-normalised rows."""
    return normalized(z).cpu().numpy()


def _labels_numpy(labels) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _class_name(class_names: Sequence[str] | None, label: int) -> str:
    return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)


def _class_colors(n: int) -> list[str]:
    """n distinct hex colours: tab10/tab20 when they suffice, else evenly spaced along 'turbo'."""
    if n <= 10:
        return [to_hex(colormaps["tab10"](k)) for k in range(n)]
    if n <= 20:
        return [to_hex(colormaps["tab20"](k)) for k in range(n)]
    return [to_hex(colormaps["turbo"](k / max(n - 1, 1))) for k in range(n)]


def _save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render to PNG in memory, then one atomic write."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _pca(x: np.ndarray, k: int) -> np.ndarray:
    """Projection of the centred rows of x on their top-k principal axes (zero-padded if D < k)."""
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[:k].T
    if proj.shape[1] < k:
        proj = np.pad(proj, ((0, 0), (0, k - proj.shape[1])))
    return proj


def _onto_sphere(x: np.ndarray) -> np.ndarray:
    """Rows scaled back to unit norm (an all-zero row stays at the origin)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most `limit` of n items, drawn without replacement."""
    return np.arange(n) if n <= limit else np.sort(rng.choice(n, size=limit, replace=False))


def _pick_classes(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k of the classes present, drawn at random (the same ones for the same seed), sorted."""
    present = np.unique(labels)
    return present if len(present) <= k else np.sort(rng.choice(present, size=k, replace=False))


# ----------------------------------------------------------------------------------------------
# t-SNE
# ----------------------------------------------------------------------------------------------

def plot_tsne(z, labels, class_names: Sequence[str] | None, path: str | Path, n_classes: int = 20,
              max_points: int = 2000, seed: int = 0, title: str | None = None,
              coarse_labels=None, coarse_names: Sequence[str] | None = None) -> Path:
    """2-D t-SNE (PCA initialisation, seeded) of the unit embeddings of `n_classes` random classes.

    With per-sample `coarse_labels` the points of every class are embedded and coloured by their
    superclass instead (whether superclasses form regions). At most `max_points` points are
    embedded (t-SNE is O(N log N) per iteration and slow on CPU).
    """
    from sklearn.manifold import TSNE  # imported here: scikit-learn is slow to import
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    z, labels = _unit_numpy(z), _labels_numpy(labels)
    rng = np.random.default_rng(seed)
    if coarse_labels is not None:  # colour by superclass: every class, the superclass as "label"
        labels, class_names, n_classes = _labels_numpy(coarse_labels), coarse_names, len(labels)
    classes = _pick_classes(labels, n_classes, rng)
    idx = np.flatnonzero(np.isin(labels, classes))
    idx = idx[_subsample(len(idx), max_points, rng)]
    if len(idx) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {len(idx)}")
    # perplexity must stay below the number of points; 30 is the usual value
    perplexity = float(min(30, max(1, (len(idx) - 1) // 3)))
    # one OpenMP thread: on a shared machine scikit-learn's spinning OpenMP workers made 600 points
    # take 37 s with 2 threads against 2 s with 1
    points = z[idx]
    # Collapsed embeddings (all points equal) make scikit-learn's t-SNE crash the process; a
    # seeded jitter far below any real spread keeps the picture (a single blob) honest.
    if np.ptp(points, axis=0).max() < 1e-6:
        points = points + 1e-4 * rng.standard_normal(points.shape)
    with threadpool_limits(limits=1):
        tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed)
        xy = tsne.fit_transform(points)

    fig = Figure(figsize=(9, 7))
    ax = fig.add_subplot()
    for colour, c in zip(_class_colors(len(classes)), classes):
        mask = labels[idx] == c
        ax.scatter(xy[mask, 0], xy[mask, 1], s=8, color=colour, label=_class_name(class_names, int(c)))
    kind = "superclasses" if coarse_labels is not None else "classes"
    ax.set_title(title or f"t-SNE of {len(classes)} {kind} ({len(idx)} points)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, frameon=False)
    return _save_png(fig, path)


# ----------------------------------------------------------------------------------------------
# 3-D hypersphere (Plotly)
# ----------------------------------------------------------------------------------------------

def _sphere_surface(go, resolution: int = 40):
    """A faint unit sphere, drawn behind the points as a visual reference."""
    theta, phi = np.meshgrid(np.linspace(0, 2 * np.pi, resolution), np.linspace(0, np.pi, resolution))
    return go.Surface(x=np.cos(theta) * np.sin(phi), y=np.sin(theta) * np.sin(phi), z=np.cos(phi),
                      opacity=0.12, showscale=False, hoverinfo="skip",
                      colorscale=[[0, "lightgrey"], [1, "lightgrey"]])


def _points_trace(go, xyz: np.ndarray, colours: list[str], text: list[str], name: str, legend: bool):
    return go.Scatter3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers", name=name,
                        showlegend=legend, text=text, hovertemplate="%{text}<extra></extra>",
                        marker={"size": 2.5, "color": colours, "opacity": 0.85})


def hypersphere_figure(z, labels, class_names: Sequence[str] | None, title: str, seed: int = 0,
                       max_points: int = 5000):
    """The Plotly figure of `plot_hypersphere` (separate so it can be shown in a notebook)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    z, labels = _unit_numpy(z), _labels_numpy(labels)
    xyz = _onto_sphere(_pca(z, 3))  # PCA to 3-D, then back onto the unit sphere
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    colour_of = dict(zip(present.tolist(), _class_colors(len(present))))
    names = [_class_name(class_names, int(c)) for c in labels]

    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "scene"}, {"type": "scene"}]],
                        subplot_titles=("All classes", "10 random classes"), horizontal_spacing=0.02)
    for col in (1, 2):
        fig.add_trace(_sphere_surface(go), row=1, col=col)

    idx = _subsample(len(labels), max_points, rng)
    fig.add_trace(_points_trace(go, xyz[idx], [colour_of[int(c)] for c in labels[idx]],
                                [names[i] for i in idx], "all classes", legend=False), row=1, col=1)
    # the 10 classes get their own 10 distinct colours: drawn from the all-class palette, classes
    # with neighbouring labels would be hard to tell apart
    for colour, c in zip(_class_colors(10), _pick_classes(labels, 10, rng)):
        idx = np.flatnonzero(labels == c)
        idx = idx[_subsample(len(idx), max(1, max_points // 10), rng)]
        fig.add_trace(_points_trace(go, xyz[idx], [colour] * len(idx),
                                    [names[i] for i in idx], names[idx[0]], legend=True), row=1, col=2)

    axis = {"range": [-1.1, 1.1], "showbackground": False, "title": ""}
    scene = {"xaxis": axis, "yaxis": axis, "zaxis": axis, "aspectmode": "cube"}
    fig.update_layout(title=title, scene=scene, scene2=scene, height=700,
                      margin={"l": 0, "r": 0, "t": 60, "b": 0}, legend={"itemsizing": "constant"})
    return fig


def plot_hypersphere(z, labels, class_names: Sequence[str] | None, path: str | Path, title: str,
                     seed: int = 0, max_points: int = 5000) -> Path:
    """Interactive 3-D view of the embeddings on the unit sphere, as a standalone HTML page.

    PCA of the unit embeddings to 3-D, rows re-normalised onto the sphere; two scenes side by side,
    "All classes" (at most `max_points` points) and "10 random classes" (seeded). The page loads
    `plotly.min.js` from its own folder by relative path (Plotly's include_plotlyjs="directory");
    the bundle is written there once, only when missing.
    """
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    fig = hypersphere_figure(z, labels, class_names, title, seed, max_points)
    path = Path(path)
    bundle = path.parent / PLOTLY_BUNDLE
    if not bundle.exists():  # concurrent writers would both write the same bytes atomically
        atomic_write_text(bundle, get_plotlyjs())
    html = pio.to_html(fig, include_plotlyjs="directory", full_html=True, div_id=HYPERSPHERE_DIV_ID)
    atomic_write_text(path, html)
    return path


# ----------------------------------------------------------------------------------------------
# Alignment and uniformity pictures (in the style of Wang & Isola, 2020)
# ----------------------------------------------------------------------------------------------

def _same_class_pairs(labels: np.ndarray, max_pairs: int, rng: np.random.Generator):
    """Up to `max_pairs` same-class pairs (i, j), i != j, drawn uniformly over all such pairs.

    A class is drawn with probability proportional to its pair count n_c(n_c - 1)/2, then two
    distinct members of it.
    """
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    weights = counts * (counts - 1) / 2.0
    total = weights.sum()
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    k = rng.choice(len(classes), size=int(min(max_pairs, total)), p=weights / total)
    first = rng.integers(0, counts[k])
    second = rng.integers(0, counts[k] - 1)
    second += second >= first  # a distinct member
    return order[starts[k] + first], order[starts[k] + second]


def _distance_panel(ax, z, labels, z_view2, rng, max_pairs: int):
    """Histogram of positive-pair distances ||z_i - z_j|| (and of random pairs, for contrast)."""
    bins = np.linspace(0, 2, 61)
    i, j = _same_class_pairs(labels, max_pairs, rng)
    if len(i):
        d = np.linalg.norm(z[i] - z[j], axis=1)
        ax.hist(d, bins=bins, density=True, alpha=0.6, color="tab:blue",
                label=f"same class (mean sq {np.mean(d ** 2):.3f})")
    if z_view2 is not None:
        d = np.linalg.norm(z - z_view2, axis=1)
        ax.hist(d, bins=bins, density=True, alpha=0.6, color="tab:green",
                label=f"two views (mean sq {np.mean(d ** 2):.3f})")
    a = rng.integers(0, len(z), size=max_pairs)
    b = rng.integers(0, len(z), size=max_pairs)
    keep = a != b
    d = np.linalg.norm(z[a[keep]] - z[b[keep]], axis=1)
    ax.hist(d, bins=bins, density=True, histtype="step", color="grey", label="random pairs")
    ax.set_xlabel(r"$\ell_2$ distance")
    ax.set_ylabel("density")
    ax.set_title("Alignment: positive-pair distances")
    ax.legend(fontsize=8)


def _circle_density_panel(ax, xy: np.ndarray):
    """Binned Gaussian KDE of the 2-D features on the unit circle, as an image."""
    from scipy.ndimage import gaussian_filter

    edges = np.linspace(-1.25, 1.25, 201)
    hist, _, _ = np.histogram2d(xy[:, 0], xy[:, 1], bins=[edges, edges])
    density = gaussian_filter(hist, sigma=3.0)  # kernel bandwidth ~ 0.04 in feature units
    ax.imshow(density.T, origin="lower", extent=(-1.25, 1.25, -1.25, 1.25), cmap="viridis")
    t = np.linspace(0, 2 * np.pi, 200)
    ax.plot(np.cos(t), np.sin(t), color="white", lw=0.5, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("Uniformity: 2-D feature density (PCA)")


def _von_mises_kde(angles: np.ndarray, grid: np.ndarray, kappa: float) -> np.ndarray:
    """p(theta) = 1/N sum_i exp(kappa cos(theta - theta_i)) / (2 pi I0(kappa)).

    Written with the scaled Bessel function i0e(kappa) = exp(-kappa) I0(kappa) so large kappa does
    not overflow:  exp(kappa (cos - 1)) / (2 pi i0e(kappa)).
    """
    from scipy.special import i0e

    kernel = np.exp(kappa * (np.cos(grid[:, None] - angles[None, :]) - 1))
    return kernel.mean(axis=1) / (2 * np.pi * i0e(kappa))


def _angle_panel(ax, xy: np.ndarray, labels: np.ndarray, class_names, rng, n_classes: int = 4,
                 kappa: float = 40.0):
    """von Mises KDE of the angles arctan2(y, x): all points and a few classes."""
    angles = np.arctan2(xy[:, 1], xy[:, 0])
    grid = np.linspace(-np.pi, np.pi, 361)
    ax.fill_between(grid, _von_mises_kde(angles, grid, kappa), color="lightgrey", label="all")
    classes = _pick_classes(labels, n_classes, rng)
    for colour, c in zip(_class_colors(10), classes):
        ax.plot(grid, _von_mises_kde(angles[labels == c], grid, kappa), color=colour, lw=1.2,
                label=_class_name(class_names, int(c)))
    ax.set_xlim(-np.pi, np.pi)
    ax.set_xlabel("angle (rad)")
    ax.set_ylabel("density")
    ax.set_title("Angle density (von Mises KDE)")
    ax.legend(fontsize=8)


def plot_alignment_uniformity(z, labels, path: str | Path, title: str, z_view2=None,
                              class_names: Sequence[str] | None = None, max_pairs: int = 20000,
                              max_points: int = 10000, seed: int = 0) -> Path:
    """Three panels: positive-pair distance histogram (alignment), density of the 2-D PCA features
    re-normalised onto the unit circle, and the density of their angles (uniformity).

    Same-class pairs are subsampled uniformly to `max_pairs`; `z_view2` (a second augmented view
    of the same images) adds the instance-pair histogram.
    """
    z, labels = _unit_numpy(z), _labels_numpy(labels)
    view2 = _unit_numpy(z_view2) if z_view2 is not None else None
    rng = np.random.default_rng(seed)
    idx = _subsample(len(labels), max_points, rng)
    z, labels = z[idx], labels[idx]
    view2 = view2[idx] if view2 is not None else None
    xy = _onto_sphere(_pca(z, 2))

    fig = Figure(figsize=(16, 4.8))
    axes = fig.subplots(1, 3)
    _distance_panel(axes[0], z, labels, view2, rng, max_pairs)
    _circle_density_panel(axes[1], xy)
    _angle_panel(axes[2], xy, labels, class_names, rng)
    fig.suptitle(title)
    return _save_png(fig, path)


# ----------------------------------------------------------------------------------------------
# Training curves and sweeps
# ----------------------------------------------------------------------------------------------

def _series(entries: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the entries that have a numeric `key`."""
    xs, ys = [], []
    for k, entry in enumerate(entries):
        value = entry.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(entry.get("epoch", k + 1))
            ys.append(float(value))
    return xs, ys


def plot_training_curves(log_entries: Sequence[Mapping], path: str | Path, title: str) -> Path:
    """Loss per epoch and train/test accuracy (%) per epoch, from a training log.

    Entries are the per-epoch dicts of `json_results/training_logs/<run>.json` (keys epoch, loss,
    train_acc, test_acc); missing or None values are skipped.
    """
    fig = Figure(figsize=(12, 4.5))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(*_series(log_entries, "loss"), marker=".", color="tab:red")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("Loss")
    for key, colour in (("train_acc", "tab:blue"), ("test_acc", "tab:orange")):
        xs, ys = _series(log_entries, key)
        if xs:
            acc_ax.plot(xs, ys, marker=".", color=colour, label=key.replace("_acc", ""))
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.set_title("Accuracy")
    if acc_ax.get_legend_handles_labels()[0]:
        acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save_png(fig, path)


def plot_sweep(values: Sequence[float], series: Mapping[str, Sequence[float | None]], path: str | Path,
               xlabel: str, title: str) -> Path:
    """One panel per series (typically accuracy, alignment, uniformity) against the swept value.

    None entries (failed or missing runs) are left out; the x axis is logarithmic when all values
    are positive and span at least two decades (e.g. alpha or beta sweeps).
    """
    values = [float(v) for v in values]
    fig = Figure(figsize=(5 * max(len(series), 1), 4.2))
    axes = np.atleast_1d(fig.subplots(1, max(len(series), 1), sharex=True))
    log_x = min(values, default=0) > 0 and max(values) / min(values) >= 100
    for ax, (name, ys) in zip(axes, series.items()):
        if len(ys) != len(values):
            raise ValueError(f"series {name!r} has {len(ys)} values for {len(values)} swept values")
        points = [(x, float(y)) for x, y in zip(values, ys) if y is not None and math.isfinite(y)]
        if points:
            ax.plot(*zip(*sorted(points)), marker="o")
        ax.set_xlabel(xlabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
    fig.suptitle(title)
    return _save_png(fig, path)


# ----------------------------------------------------------------------------------------------
# Layer-by-layer CKA
# ----------------------------------------------------------------------------------------------

def plot_cka_heatmap(matrix: np.ndarray, layers_a: Sequence[str], layers_b: Sequence[str], path: str | Path,
                     name_a: str, name_b: str) -> Path:
    """CKA between every layer of model A (rows) and of model B (columns), values written in."""
    matrix = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=(1.2 + 0.9 * len(layers_b), 1.2 + 0.7 * len(layers_a)))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="lower", aspect="auto")
    ax.set_xticks(range(len(layers_b)), layers_b, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers_a)), layers_a, fontsize=8)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if matrix[i, j] > 0.6 else "white")
    ax.set_xlabel(_short(name_b), fontsize=8)
    ax.set_ylabel(_short(name_a), fontsize=8)
    ax.set_title("linear CKA (unbiased, minibatch)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _save_png(fig, path)


def _short(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else name[:limit - 3] + "..."
