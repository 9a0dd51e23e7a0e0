"""Analysis of finished runs (SPEC section 7): test-set embeddings, metrics, pictures, records.

Every finished run (the teacher too) is analysed on the test set: projection-head outputs of the
clean images give the metrics and pictures, two seeded augmented views give instance alignment,
and the teacher's embeddings of the same images give the semantic agreement. The results go to
the runs' records (`store/records.py`), never into a checkpoint; the teacher's test embeddings are
kept once per teacher, so `analyze` on a checkpoint (with `pth_models/teacher_embeddings/`)
reproduces the recorded numbers without the teacher.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from desupcon.analysis import metrics as analysis, plots
from desupcon.config import RunConfig
from desupcon.data import eval_batches, ImageDataset, TwoViewAugment
from desupcon.engine.dataset import EVAL_BATCH
from desupcon.engine.devices import as_policy, to_device
from desupcon.models import Teacher
from desupcon.store import records
from desupcon.store.cache import load_student
from desupcon.store.checkpoint import load_checkpoint
from desupcon.store.paths import OutputPaths


log = logging.getLogger("desupcon")
ANALYSIS_SEED = 1234  # the augmented views of the test set used for instance alignment


@torch.no_grad()
def embed(project, images: torch.Tensor, dataset: ImageDataset, device: torch.device,
          augment_seed: int | None = None):
    """Normalised float32 embeddings (N, D) on the CPU; `project(normalised_batch) -> (B, D)`, or a
    tuple of such tensors (then a tuple of embeddings comes back, one per space).

    With `augment_seed` the images go through the training augmentation (seeded) first.
    """
    out: list[list[torch.Tensor]] = []
    policy = as_policy(device)

    def keep(result):
        parts = result if isinstance(result, tuple) else (result,)
        for i, part in enumerate(parts):
            if len(out) <= i:
                out.append([])
            out[i].append(part.float().cpu())

    if augment_seed is None:
        for x, _ in eval_batches(images, torch.zeros(len(images)), EVAL_BATCH, dataset.mean, dataset.std):
            with policy.autocast():
                keep(project(policy.inputs(x)))
    else:
        gen = torch.Generator().manual_seed(augment_seed)
        augment = TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
        for start in range(0, len(images), EVAL_BATCH):
            with policy.autocast():
                batch = to_device(images[start:start + EVAL_BATCH], dataset.mean.device)
                keep(project(policy.inputs(augment(batch, gen))))
    spaces = tuple(torch.nn.functional.normalize(torch.cat(parts), dim=1) for parts in out)
    return spaces if len(spaces) > 1 else spaces[0]


def named_pairs_for(dataset: ImageDataset):
    return analysis.DEFAULT_NAMED_PAIRS


def teacher_embeddings(teacher: Teacher, dataset: ImageDataset, device: torch.device) -> torch.Tensor:
    teacher.eval()
    return embed(lambda x: teacher.project(teacher(x).features), dataset.test_images, dataset, device)


def teacher_spaces(teacher: Teacher):
    """(backbone features, projection, logits) of the teacher, for `compute_metrics`."""
    def spaces(x):
        out = teacher(x)
        return out.features, teacher.project(out.features), out.logits
    return spaces


def student_spaces(student):
    def spaces(x):
        out = student(x)
        return out.features, out.projection, out.logits
    return spaces


def compute_metrics(spaces, dataset: ImageDataset, device: torch.device,
                    teacher_z: torch.Tensor | None) -> tuple[dict, torch.Tensor, list[int]]:
    """(metrics, clean projection-head test embeddings, test predictions) of one model.

    `spaces(x) -> (backbone features, projection, logits)`. The top-level metrics are in the
    projection-head space (the published tables); `metrics["backbone"]` holds the same metrics on
    the normalised backbone features (SPEC 7: a CE student's projector never trains, so its
    projection-head numbers describe a random projection of its features). The predicted class of
    every test image (in the dataset's order) lets the report compare two models image by image.
    """
    feats, z, logits = embed(spaces, dataset.test_images, dataset, device)
    f1, view1, _ = embed(spaces, dataset.test_images, dataset, device, augment_seed=ANALYSIS_SEED)
    f2, view2, _ = embed(spaces, dataset.test_images, dataset, device, augment_seed=ANALYSIS_SEED + 1)
    labels = dataset.test_labels.cpu()
    coarse = dataset.test_coarse_labels.cpu() if dataset.test_coarse_labels is not None else None
    metrics = analysis.analyze_embeddings(z, labels, dataset.classes, coarse_labels=coarse,
                                          teacher_z=teacher_z, named_pairs=named_pairs_for(dataset))
    metrics["alignment_instance"] = analysis.alignment_instance(view1, view2)
    backbone = analysis.analyze_embeddings(feats, labels, dataset.classes, coarse_labels=coarse,
                                           named_pairs=named_pairs_for(dataset))
    backbone["alignment_instance"] = analysis.alignment_instance(f1, f2)
    metrics["backbone"] = backbone
    # `embed` normalises every output; a positive rescaling of a row keeps its argmax
    return metrics, z, logits.argmax(1).tolist()


def draw_pictures(name: str, z: torch.Tensor, dataset: ImageDataset, log_entries: list[dict],
                  paths: OutputPaths) -> dict[str, str]:
    labels = dataset.test_labels.cpu()
    folder = paths.plots
    out = {
        "tsne": plots.plot_tsne(z, labels, dataset.classes, folder / f"{name}_tsne.png",
                                title=f"t-SNE: {name}"),
        "hypersphere": plots.plot_hypersphere(z, labels, dataset.classes,
                                              folder / f"{name}_hypersphere.html", title=name),
        "alignment_uniformity": plots.plot_alignment_uniformity(
            z, labels, folder / f"{name}_alignment_uniformity.png", title=name,
            class_names=dataset.classes),
    }
    if dataset.test_coarse_labels is not None:
        out["tsne_superclass"] = plots.plot_tsne(
            z, labels, dataset.classes, folder / f"{name}_tsne_superclass.png",
            title=f"t-SNE by superclass: {name}", coarse_labels=dataset.test_coarse_labels.cpu(),
            coarse_names=dataset.coarse_classes)
    if log_entries:
        out["training_curves"] = plots.plot_training_curves(
            log_entries, folder / f"{name}_training_curves.png", title=name)
    return {k: str(Path(v).relative_to(paths.root)) for k, v in out.items()}


COLLAPSE_UNIFORMITY = -0.05  # backbone uniformity above this: the test embeddings nearly coincide
CHANCE_SDS = 3.0  # accuracy within this many binomial sd of guessing counts as chance


def collapse_reasons(accuracy: dict, num_classes: int, n_test: int, metrics: dict) -> list[str]:
    """Why a finished run counts as collapsed (empty: it does not): its best test accuracy within
    3 sd of guessing on `n_test` images, or its backbone embeddings without direction or nearly
    coinciding (uniformity near 0) while the loss stayed finite."""
    reasons = []
    best = accuracy.get("best_test_acc")
    best = accuracy.get("test_acc") if best is None else best
    p = 1.0 / num_classes
    ceiling = 100 * (p + CHANCE_SDS * math.sqrt(p * (1 - p) / max(n_test, 1)))
    if best is not None and best <= ceiling:
        reasons.append(f"accuracy at chance (best {best:.2f} % vs chance {100 * p:.2f} %, within "
                       f"{CHANCE_SDS:g} sd of guessing on {n_test} test images)")
    for space, m in (("projection", metrics), ("backbone", metrics.get("backbone") or {})):
        if m.get("zero_vectors"):
            reasons.append(f"{space}: {100 * m['zero_vectors']:.0f} % of the test embeddings are zero vectors")
    uniformity = (metrics.get("backbone") or {}).get("uniformity")
    if uniformity is not None and uniformity > COLLAPSE_UNIFORMITY:
        reasons.append(f"backbone embeddings collapsed (uniformity {uniformity:.4f}, near 0: the test "
                       "images' features nearly coincide)")
    return reasons


def finite_or_null(metrics: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """The metrics with every non-finite number replaced by None (null in the records), and the
    names of those replaced (`backbone.uniformity`): a run whose embeddings went NaN keeps its
    record, marked, instead of losing it to the records' refusal of NaN."""
    clean, bad = {}, []
    for key, value in metrics.items():
        if isinstance(value, dict):
            clean[key], inner = finite_or_null(value, f"{prefix}{key}.")
            bad += inner
        elif isinstance(value, float) and not math.isfinite(value):
            clean[key] = None
            bad.append(f"{prefix}{key}")
        else:
            clean[key] = value
    return clean, bad


def _warn_if_collapsed(record: dict) -> None:
    if record["collapsed"]:
        log.warning(f"[{record['run']}] COLLAPSED: {'; '.join(record['collapsed'])} (the run is kept and "
                    "marked in its record and the report; check the learning rate and the data)")


def _analysed_record(ckpt: dict, kind: str, metrics: dict, pictures: dict, teacher_info: dict,
                     predictions: list[int], dataset: ImageDataset) -> dict:
    metrics, not_finite = finite_or_null(metrics)
    record = records.build_record(ckpt, kind, analysis=metrics, pictures=pictures, teacher=teacher_info)
    record["collapsed"] = collapse_reasons(record["accuracy"], dataset.num_classes, len(dataset.test_labels),
                                           metrics)
    if not_finite:
        record["collapsed"].append(f"analysis metrics not finite ({', '.join(not_finite[:4])}"
                                   f"{', ...' if len(not_finite) > 4 else ''}: stored as null)")
    _warn_if_collapsed(record)
    # per-image predictions (and the labels, in the dataset's order): the report's agreement with the
    # teacher and McNemar tests between runs come from them
    record.update(test_predictions=predictions, test_labels=dataset.test_labels.tolist())
    return record


def analyze_student_checkpoint(path: Path, dataset: ImageDataset, device: torch.device,
                               teacher: Teacher | None = None, pictures: bool = True,
                               output_root: Path | None = None) -> dict:
    """Analyse a saved student and write its record (the checkpoint itself is never rewritten).

    The teacher's test embeddings come from `teacher` when given (and are then kept under
    `pth_models/teacher_embeddings/`, by the teacher's content), else from that store in the
    output folder or beside the checkpoint; without them the semantic-agreement metrics are left out.
    """
    path = Path(path)
    student, ckpt = load_student(path, as_policy(device))
    cfg = RunConfig.from_dict(ckpt["config"])
    own_root = path.parent.parent.parent if path.parent.name == "imported" else path.parent.parent
    paths = OutputPaths(own_root if output_root is None else output_root)
    data_identity = cfg.data_identity()
    if teacher is not None:
        teacher_info = {"fingerprint": getattr(teacher, "fingerprint", None),
                        "source": getattr(teacher, "source", None)}
        teacher_z = None
        if getattr(teacher, "head_probed", True):  # (an unprobed head's embeddings mean nothing)
            # once per teacher content and test set: every later student of a sweep reads them
            teacher_z = records.load_teacher_embeddings([paths.root], teacher_info["fingerprint"], data_identity,
                                                        rows=dataset.test_labels.shape[0])
            if teacher_z is None:
                teacher_z = teacher_embeddings(teacher, dataset, device)
                records.save_teacher_embeddings(paths.root, teacher_info["fingerprint"], data_identity, teacher_z)
    else:
        # the teacher it was analysed with before (an imported published file names none itself)
        old = (records.read_record(cfg, ckpt["name"], paths.root)
               or records.read_record(cfg, ckpt["name"], own_root) or {})
        fp = ckpt.get("teacher_fingerprint") or (old.get("teacher") or {}).get("fingerprint")
        teacher_z = records.load_teacher_embeddings([paths.root, own_root], fp, data_identity)
        if teacher_z is None:  # a checkpoint of an older version kept them inside
            teacher_z = (ckpt.get("analysis") or {}).get("teacher_test_embeddings")
        if teacher_z is None and fp is not None:
            log.info(f"[{ckpt['name']}] no stored test embeddings of its teacher ({fp}): the semantic-agreement "
                     "metrics are left out (copy pth_models/teacher_embeddings/ with the checkpoint)")
        teacher_info = old.get("teacher") or {"fingerprint": fp, "source": None}
    metrics, z, predictions = compute_metrics(student_spaces(student), dataset, device, teacher_z)
    pics = draw_pictures(ckpt["name"], z, dataset, ckpt["log"], paths) if pictures else {}
    record = _analysed_record(ckpt, "student", metrics, pics, teacher_info, predictions, dataset)
    records.write_record(cfg, ckpt["name"], record, paths.root)
    if cfg.tensorboard or cfg.wandb:
        from desupcon.engine.tracking import RunTracker
        tracker = RunTracker(ckpt["name"], paths.root, cfg.tensorboard, cfg.wandb, cfg.to_dict())
        tracker.final({"test_acc": ckpt["metrics"].get("test_acc"), **metrics})
        tracker.close()
    shown = finite_or_null(metrics)[0]
    log.info(f"[{ckpt['name']}] alignment {_number(shown['alignment_class'])} "
             f"uniformity {_number(shown['uniformity'])} (projection head); backbone alignment "
             f"{_number(shown['backbone']['alignment_class'])} uniformity {_number(shown['backbone']['uniformity'])}")
    return metrics


def _number(value) -> str:
    return "not finite" if value is None else f"{value:.4f}"


def analyze_teacher(teacher: Teacher, cfg: RunConfig, teacher_metrics: dict, dataset: ImageDataset,
                    device: torch.device, pictures: bool = True) -> dict:
    """Analyse the teacher (probe-trained head) once and record it beside the students."""
    from desupcon.config import teacher_run_name
    from desupcon.teacher import teacher_checkpoint_path
    paths = OutputPaths(cfg.output_dir)
    name = teacher_run_name(cfg, with_projection=True)
    ckpt = load_checkpoint(teacher_checkpoint_path(cfg), "teacher_projection")
    ckpt = {**ckpt, "name": name, "metrics": teacher_metrics, "config": cfg.to_dict()}
    stored = records.read_record(cfg, name) or {}
    if "backbone" in stored.get("metrics", {}) and "test_predictions" in stored:  # analysed before
        metrics, pics, predictions = stored["metrics"], stored.get("plots", {}), stored["test_predictions"]
    else:
        teacher.eval()
        metrics, z, predictions = compute_metrics(teacher_spaces(teacher), dataset, device, None)
        pics = draw_pictures(name, z, dataset, [], paths) if pictures else {}
    info = {"fingerprint": getattr(teacher, "fingerprint", None), "source": getattr(teacher, "source", None)}
    records.write_record(cfg, name, _analysed_record(ckpt, "teacher", metrics, pics, info, predictions, dataset))
    return metrics
