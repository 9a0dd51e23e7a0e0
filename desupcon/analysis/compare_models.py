"""`compare A B` and `similarity A B` (SPEC 16): two saved models on the same test images.

A and B are student checkpoints (ours or imported), teacher checkpoints, run names under the
output folder, or `teacher` (the teacher the other model was distilled from). One pass over the
test set gives both models' predictions, final features and every stage's pooled output; the
layer-by-layer CKA is accumulated minibatch by minibatch (`compare.MinibatchCKA`), so no layer's
activations over the whole test set are ever held.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.analysis import compare, plots
from desupcon.config import RunConfig
from desupcon.config.validation import ConfigError
from desupcon.data import eval_batches, ImageDataset
from desupcon.engine.dataset import EVAL_BATCH, prepare_dataset
from desupcon.engine.devices import DevicePolicy, select_device
from desupcon.errors import InputFileError
from desupcon.models import build_encoder, load_matching_state_dict, StageNeeds, Teacher
from desupcon.store.cache import load_student
from desupcon.store.checkpoint import atomic_write_json, CheckpointError, load_checkpoint
from desupcon.store.paths import OutputPaths, saved_run_path
from desupcon.teacher import teacher_checkpoint_path


# The data settings that decide which test images a model is evaluated on.
_TEST_DATA = ("dataset", "test_subset", "image_size")


@dataclass
class SavedModel:
    """A student or teacher loaded for comparison."""

    name: str
    kind: str  # "student" | "teacher"
    model: nn.Module
    cfg: RunConfig
    path: Path

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def stage_names(self) -> list[str]:
        """The encoder's declared stages after the stem (`stage_channels`), named in the
        torchvision convention: layer1 ... layerN."""
        return [f"layer{i}" for i in range(1, len(self.encoder.stage_channels()))]

    def layer_names(self) -> list[str]:
        """Every stage's pooled output (the last one is the final features) and the projection."""
        return [*self.stage_names(), "projection"]

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(pooled stage outputs + projection, final features, logits) of one batch, float32: the
        stages every architecture declares, from the model's one forward."""
        out = self.model(x, needs=StageNeeds(stages=True))
        projection = out.projection if self.kind == "student" else self.model.project(out.features)
        pooled = [F.adaptive_avg_pool2d(f, 1).flatten(1).float() for f in out.stages.feats[1:]]
        return [*pooled, projection.float()], out.features.float(), out.logits.float()


def _teacher_from_checkpoint(ckpt: dict, path: Path, policy: DevicePolicy) -> Teacher:
    teacher = Teacher(build_encoder(ckpt["arch"], ckpt["num_classes"]))
    load_matching_state_dict(teacher.encoder, ckpt["encoder"], source=str(path))
    if "head" in ckpt:
        teacher.head.load_state_dict(ckpt["head"])
    return policy.prepare(teacher).eval()


def load_saved_model(spec: str, output_dir: str | Path, policy: DevicePolicy,
                     reference: SavedModel | None = None) -> SavedModel:
    """`spec` is a checkpoint path, a run name under `output_dir`, or `teacher` (the teacher of the
    `reference` student, from its teacher checkpoint under `output_dir`, evaluated on the student's
    test images)."""
    if spec == "teacher":
        if reference is None or reference.kind != "student":
            raise InputFileError("`teacher` names the teacher of the other model: give a student as the "
                                 "other one (e.g. compare RUN teacher)")
        path = teacher_checkpoint_path(reference.cfg.replace(output_dir=str(output_dir)))
        if not path.is_file():
            raise InputFileError(f"the teacher of {reference.name} is not at {path}; train or load it first "
                                 f"(desupcon.py teacher with the run's settings) or pass its checkpoint file")
    else:
        path = saved_run_path(spec, output_dir)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise InputFileError(f"{path}: not a desupcon checkpoint ({exc}); a published student file is "
                             "imported first with `desupcon.py analyze FILE`") from None
    kind = ckpt.get("kind")
    if kind == "student":
        model, ckpt = load_student(path, policy)
        return SavedModel(ckpt["name"], "student", model, RunConfig.from_dict(ckpt["config"]), path)
    if kind in ("teacher", "teacher_projection"):
        cfg = reference.cfg if spec == "teacher" else RunConfig.from_dict(ckpt["config"])
        return SavedModel(ckpt["name"], "teacher", _teacher_from_checkpoint(ckpt, path, policy), cfg, path)
    raise InputFileError(f"{path} is a {kind!r} checkpoint; compare students and teachers")


def check_same_test_images(a: SavedModel, b: SavedModel) -> None:
    """Both models must be evaluated on the same test images (same dataset and test subset)."""
    da, db = a.cfg.data, b.cfg.data
    differing = [k for k in _TEST_DATA if getattr(da, k) != getattr(db, k)]
    if da.test_subset and da.subset_sampling != db.subset_sampling:
        differing.append("subset_sampling")
    if differing:
        shown = ", ".join(f"{k} {getattr(da, k)!r} vs {getattr(db, k)!r}" for k in differing)
        raise InputFileError(f"{a.name} and {b.name} were evaluated on different test data ({shown}); "
                             "compare models of the same dataset and test subset")


@dataclass
class TestPass:
    """What one pass over the test set collects from both models."""

    labels: torch.Tensor
    predictions: tuple[torch.Tensor, torch.Tensor]
    features: tuple[torch.Tensor, torch.Tensor]
    layer_cka: torch.Tensor | None


def run_test_pass(a: SavedModel, b: SavedModel, dataset: ImageDataset, policy: DevicePolicy,
                  layers: bool, batch_size: int = EVAL_BATCH) -> TestPass:
    preds, feats = ([], []), ([], [])
    cka = compare.MinibatchCKA(len(a.layer_names()), len(b.layer_names())) if layers else None
    for x, _ in eval_batches(dataset.test_images, dataset.test_labels, batch_size, dataset.mean, dataset.std):
        x = policy.inputs(x)
        with policy.autocast():
            (layers_a, feat_a, logit_a), (layers_b, feat_b, logit_b) = a.outputs(x), b.outputs(x)
        for i, (f, z) in enumerate(((feat_a, logit_a), (feat_b, logit_b))):
            feats[i].append(f.cpu().double())
            preds[i].append(z.argmax(1).cpu())
        if cka is not None and x.shape[0] >= 4:  # the unbiased HSIC needs 4 samples
            cka.update([t.cpu() for t in layers_a], [t.cpu() for t in layers_b])
    return TestPass(dataset.test_labels.cpu(), (torch.cat(preds[0]), torch.cat(preds[1])),
                    (torch.cat(feats[0]), torch.cat(feats[1])), cka.result() if cka is not None else None)


def pair_stem(a: str, b: str) -> str:
    """A file-name stem for the pair, shortened with a hash when the names are long."""
    stem = f"{a}__vs__{b}"
    if len(stem) <= 180:
        return stem
    return f"{a[:80]}__vs__{b[:80]}_{hashlib.sha256(stem.encode()).hexdigest()[:10]}"


def _prepare(spec_a: str, spec_b: str, output_dir, device: str, data_root: str | None):
    policy = DevicePolicy.choose(select_device(device))
    a = load_saved_model(spec_a, output_dir, policy) if spec_a != "teacher" else None
    b = load_saved_model(spec_b, output_dir, policy, reference=a)
    if a is None:
        a = load_saved_model(spec_a, output_dir, policy, reference=b)
    check_same_test_images(a, b)
    cfg = a.cfg.replace(device=device, **({"data": {"data_root": data_root}} if data_root else {}))
    dataset = prepare_dataset(cfg, policy.device)
    return a, b, dataset, policy


def compare_models(spec_a: str, spec_b: str, output_dir: str | Path = ".", device: str = "auto",
                   data_root: str | None = None, json_path: str | Path | None = None, mi_dims: int = 8,
                   mi_k: int = 3, cka_sigma: float = 1.0, rbf_points: int = 5000, seed: int = 0) -> dict:
    """Prediction statistics, final-feature CKA (linear, RBF, unbiased) and mutual information of
    two models on the test set; written to json_results/compare/<A>__vs__<B>.json (and `json_path`)."""
    a, b, dataset, policy = _prepare(spec_a, spec_b, output_dir, device, data_root)
    n_test = dataset.test_labels.shape[0]
    if not 1 <= mi_k < n_test:  # before the test pass: the KSG estimator needs k < n
        raise ConfigError(f"--mi-k {mi_k} is out of range for {n_test} test images; it must be in [1, {n_test - 1}]")
    result = run_test_pass(a, b, dataset, policy, layers=False)
    fa, fb = result.features
    out = {"model_a": a.name, "model_b": b.name, "kind_a": a.kind, "kind_b": b.kind,
           "dataset": a.cfg.data.dataset, **compare.prediction_statistics(
               *result.predictions, result.labels, class_names=dataset.classes)}
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(fa), size=min(rbf_points, len(fa)), replace=False))
    out.update({"cka_linear": compare.linear_cka(fa, fb), "cka_unbiased": compare.unbiased_cka(fa, fb),
                "cka_rbf": compare.rbf_cka(fa[pick], fb[pick], cka_sigma),
                "cka_rbf_sigma": cka_sigma, "cka_rbf_points": len(pick)})
    pa, pb = compare.pca(fa, mi_dims), compare.pca(fb, mi_dims)
    out["mutual_information"] = {
        "estimator": "KSG algorithm 1 (Chebyshev); labels: Ross 2014", "k": mi_k, "d": pa.shape[1], "n": len(pa),
        "unit": "nats", "a_b": compare.ksg_mutual_information(pa, pb, mi_k),
        "a_labels": compare.mixed_mutual_information(pa, result.labels, mi_k),
        "b_labels": compare.mixed_mutual_information(pb, result.labels, mi_k)}
    paths = OutputPaths(output_dir)
    written = paths.results / "compare" / f"{pair_stem(a.name, b.name)}.json"
    atomic_write_json(written, out)
    if json_path is not None:
        atomic_write_json(json_path, out)
    out["written_to"] = str(written)
    return out


def layer_similarity(spec_a: str, spec_b: str, output_dir: str | Path = ".", device: str = "auto",
                     data_root: str | None = None, json_path: str | Path | None = None,
                     batch_size: int = EVAL_BATCH) -> dict:
    """The layer-by-layer (unbiased minibatch) linear CKA of two models over the whole test set:
    a JSON matrix (json_results/similarity/) and a heatmap (plots/cka_<A>__vs__<B>.png)."""
    a, b, dataset, policy = _prepare(spec_a, spec_b, output_dir, device, data_root)
    result = run_test_pass(a, b, dataset, policy, layers=True, batch_size=batch_size)
    paths = OutputPaths(output_dir)
    stem = pair_stem(a.name, b.name)
    png = plots.plot_cka_heatmap(result.layer_cka.numpy(), a.layer_names(), b.layer_names(),
                                 paths.plots / f"cka_{stem}.png", a.name, b.name)
    out = {"model_a": a.name, "model_b": b.name, "layers_a": a.layer_names(), "layers_b": b.layer_names(),
           "estimator": "unbiased linear CKA over minibatches (Nguyen et al. 2021)", "batch_size": batch_size,
           "n": len(result.labels), "cka": result.layer_cka.tolist(), "heatmap": str(png)}
    atomic_write_json(paths.results / "similarity" / f"{stem}.json", out)
    if json_path is not None:
        atomic_write_json(json_path, out)
    return out
