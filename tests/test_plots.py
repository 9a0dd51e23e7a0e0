"""Tests of desupcon.analysis.plots (SPEC section 7 pictures).

Every PNG must decode and not be blank; the hypersphere page must load plotly.min.js from its own
folder (written once) and hold two 3-D scenes. When Chromium is installed, the page is also opened
headless to check that Plotly really renders both WebGL scenes, and a screenshot is taken.
"""

import base64
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from desupcon.analysis import plots

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def embeddings():
    """600 points in 16-D around 12 class means, a second view, and class names."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 12
    z = (torch.randn(12, 16, generator=g) * 2)[labels] + torch.randn(600, 16, generator=g)
    view2 = z + 0.3 * torch.randn(z.shape, generator=g)
    names = [f"class_{k}" for k in range(12)]
    return z, labels, view2, names


def assert_png_not_blank(path: Path):
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(np.std(image)) > 0, f"{path} is blank"


def assert_no_temp_files(folder: Path):
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, f"atomic writes left {leftovers}"


# --------------------------------------------------------------------------------------
# PNGs
# --------------------------------------------------------------------------------------


def test_tsne_png(tmp_path, embeddings):
    z, labels, _, names = embeddings
    path = plots.plot_tsne(z, labels, names, tmp_path / "tsne.png", n_classes=5, max_points=150)
    assert path == tmp_path / "tsne.png"
    assert_png_not_blank(path)
    assert_no_temp_files(tmp_path)


def test_alignment_uniformity_png(tmp_path, embeddings):
    z, labels, view2, names = embeddings
    for name, extra in (("au.png", {}), ("au_views.png", {"z_view2": view2, "class_names": names})):
        path = plots.plot_alignment_uniformity(z, labels, tmp_path / name, "alignment/uniformity", **extra)
        assert_png_not_blank(path)
    # numpy input and a class with a single sample (no same-class pair of its own) are fine
    labels_np = labels.numpy().copy()
    labels_np[0] = 99
    assert_png_not_blank(plots.plot_alignment_uniformity(z.numpy(), labels_np, tmp_path / "np.png", "np"))


def test_training_curves_png(tmp_path):
    log = [{"epoch": e, "loss": 5 / e, "train_acc": 40 + 3 * e, "test_acc": None if e == 1 else 35 + 2 * e,
            "lr": 0.1, "seconds": 1.0} for e in range(1, 8)]
    assert_png_not_blank(plots.plot_training_curves(log, tmp_path / "curves.png", "run"))


def test_sweep_png(tmp_path):
    series = {"accuracy": [60.1, 62.3, None, 58.0], "alignment": [0.4, 0.35, 0.3, 0.2],
              "uniformity": [-3.1, -3.4, -3.6, -3.8]}
    path = plots.plot_sweep([0.1, 1.0, 10.0, 100.0], series, tmp_path / "sweep.png", "alpha", "alpha sweep")
    assert_png_not_blank(path)
    with pytest.raises(ValueError, match="accuracy"):
        plots.plot_sweep([1, 2], {"accuracy": [1.0]}, tmp_path / "bad.png", "x", "bad")


# --------------------------------------------------------------------------------------
# Hypersphere HTML
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hypersphere_html(tmp_path_factory, embeddings):
    z, labels, _, names = embeddings
    folder = tmp_path_factory.mktemp("html")
    return plots.plot_hypersphere(z, labels, names, folder / "sphere.html", "test sphere")


def _plotly_figure_json(html: str) -> dict:
    """The data and layout passed to Plotly.newPlot("hypersphere", data, layout, config)."""
    match = re.search(r'Plotly\.newPlot\(\s*"hypersphere",\s*', html)
    assert match, "Plotly.newPlot call for div 'hypersphere' not found"
    decoder = json.JSONDecoder()
    data, end = decoder.raw_decode(html, match.end())
    layout, _ = decoder.raw_decode(html, re.compile(r",\s*").match(html, end).end())
    return {"data": data, "layout": layout}


def _array(value) -> np.ndarray:
    """A Plotly JSON array: a plain list, or (plotly >= 6) {"dtype": ..., "bdata": base64}."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value, dtype=np.float64)


def test_hypersphere_html(hypersphere_html, embeddings):
    folder = hypersphere_html.parent
    html = hypersphere_html.read_text()
    # plotly.js is loaded by relative path from the same folder, not inlined or from a CDN
    assert re.search(r'<script[^>]*src="plotly\.min\.js"', html)
    assert "cdn.plot.ly" not in html and len(html) < 2_000_000
    bundle = folder / "plotly.min.js"
    assert bundle.stat().st_size > 1_000_000
    figure = _plotly_figure_json(html)
    layout = figure["layout"]
    assert {"scene", "scene2"} <= set(layout) and "scene3" not in layout
    assert {t["scene"] for t in figure["data"]} == {"scene", "scene2"}
    assert sum(t["type"] == "surface" for t in figure["data"]) == 2
    titles = {a["text"] for a in layout["annotations"]}
    assert {"All classes", "10 random classes"} <= titles
    # every point lies on the unit sphere and carries its class name
    for trace in figure["data"]:
        if trace["type"] == "scatter3d":
            xyz = np.stack([_array(trace[axis]) for axis in "xyz"], axis=1)
            assert np.allclose(np.linalg.norm(xyz, axis=1), 1.0)
            assert all(t.startswith("class_") for t in trace["text"])
    assert_no_temp_files(folder)


def test_plotly_bundle_written_once(hypersphere_html, embeddings):
    z, labels, _, names = embeddings
    bundle = hypersphere_html.parent / "plotly.min.js"
    before = bundle.stat()
    second = plots.plot_hypersphere(z, labels, names, hypersphere_html.parent / "other.html", "again")
    after = bundle.stat()
    assert second.is_file()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in hypersphere_html.parent.iterdir()) == \
        ["other.html", "plotly.min.js", "sphere.html"]


# --------------------------------------------------------------------------------------
# Rendering in a real browser
# --------------------------------------------------------------------------------------


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    # --enable-unsafe-swiftshader: software WebGL, needed for Plotly's 3-D scenes without a GPU
    # (Chromium deprecated the silent fallback); the page is our own local file
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
             "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed "
                                                  "(apt-get install -y chromium to run the browser test)")
def test_hypersphere_renders_in_chromium(hypersphere_html, tmp_path):
    url = hypersphere_html.resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # the figure was drawn by plotly.js (loaded from the relative path) into our div
    assert re.search(r'<div id="hypersphere" class="[^"]*js-plotly-plot', html), "plot div not rendered"
    assert 'class="plot-container plotly"' in html
    # Plotly's gl3d places one <div id="sceneN"> per 3-D scene inside the gl-container, each with a
    # WebGL <canvas> once drawn
    assert 'class="gl-container"' in html
    scene_divs = re.split(r'(?=<div id="scene\d*")', html)[1:]
    scenes = sorted(re.match(r'<div id="(scene\d*)"', d).group(1) for d in scene_divs)
    assert scenes == ["scene", "scene2"], scenes
    assert all("<canvas" in d for d in scene_divs), "a 3-D scene has no WebGL canvas"
    assert "WebGL is not supported" not in html

    shot = tmp_path / "hypersphere.png"
    result = _chromium([f"--screenshot={shot}", "--window-size=1400,700", url], tmp_path / "profile2")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = imread(shot)
    assert image.shape[:2] == (700, 1400)
    assert float(np.std(image)) > 0.01
    # the scenes are not empty: coloured marker pixels (not grey/white) in both halves
    rgb = image[..., :3]
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.25
    assert coloured[:, :700].sum() > 200 and coloured[:, 700:].sum() > 200

