"""Analysis of finished runs (SPEC section 7): test-set embeddings, metrics, pictures, records.

Every finished run (the teacher too) is analysed on the test set: projection-head outputs of the
clean images give the metrics and pictures, two seeded augmented views give instance alignment,
and the teacher's embeddings of the same images give the semantic agreement. The teacher's test
embeddings are stored with the student's metrics, so `analyze` on a checkpoint copied elsewhere
reproduces the stored numbers without the teacher.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import analysis, plots
from .checkpoint import atomic_torch_save, load_checkpoint, update_json_records
from .config import RunConfig, dataset_tag
from .data import ImageDataset, TwoViewAugment, eval_batches
from .models import Teacher
from .devices import autocast_for, to_device
from .runs import EVAL_BATCH, OutputPaths
from .train import load_student

log = logging.getLogger("desupcon")
ANALYSIS_SEED = 1234  # the augmented views of the test set used for instance alignment


@torch.no_grad()
def embed(project, images: torch.Tensor, dataset: ImageDataset, device: torch.device,
          augment_seed: int | None = None) -> torch.Tensor:
    """Normalised float32 embeddings (N, D) on the CPU; `project(normalised_batch) -> (B, D)`.

    With `augment_seed` the images go through the training augmentation (seeded) first.
    """
    out = []
    if augment_seed is None:
        for x, _ in eval_batches(images, torch.zeros(len(images)), EVAL_BATCH, dataset.mean, dataset.std):
            with autocast_for(device):
                out.append(project(x).float().cpu())
    else:
        gen = torch.Generator().manual_seed(augment_seed)
        augment = TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
        for start in range(0, len(images), EVAL_BATCH):
            with autocast_for(device):
                batch = to_device(images[start:start + EVAL_BATCH], dataset.mean.device)
                out.append(project(augment(batch, gen)).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def named_pairs_for(dataset: ImageDataset):
    return analysis.DEFAULT_NAMED_PAIRS


def teacher_embeddings(teacher: Teacher, dataset: ImageDataset, device: torch.device) -> torch.Tensor:
    teacher.eval()
    return embed(lambda x: teacher.project(teacher(x)[0]), dataset.test_images, dataset, device)


def compute_metrics(project, dataset: ImageDataset, device: torch.device,
                    teacher_z: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """(metrics, clean test embeddings) for one model's projection function."""
    z = embed(project, dataset.test_images, dataset, device)
    view1 = embed(project, dataset.test_images, dataset, device, augment_seed=ANALYSIS_SEED)
    view2 = embed(project, dataset.test_images, dataset, device, augment_seed=ANALYSIS_SEED + 1)
    labels = dataset.test_labels.cpu()
    coarse = dataset.test_coarse_labels.cpu() if dataset.test_coarse_labels is not None else None
    metrics = analysis.analyze_embeddings(z, labels, dataset.classes, coarse_labels=coarse,
                                          teacher_z=teacher_z, named_pairs=named_pairs_for(dataset))
    metrics["alignment_instance"] = analysis.alignment_instance(view1, view2)
    return metrics, z


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
    if log_entries:
        out["training_curves"] = plots.plot_training_curves(
            log_entries, folder / f"{name}_training_curves.png", title=name)
    return {k: str(Path(v).relative_to(paths.root)) for k, v in out.items()}


def comprehensive_results_path(paths: OutputPaths, student_arch: str, dataset: str) -> Path:
    return paths.results / f"comprehensive_results_{student_arch}_{dataset_tag(dataset)}.json"


def _record(kind: str, name: str, cfg: RunConfig, metrics: dict, analysis_metrics: dict,
            pictures: dict) -> dict:
    acc = {"test_acc": metrics.get("test_acc"), "train_acc": metrics.get("train_acc")}
    if acc["test_acc"] is not None and acc["train_acc"] is not None:
        acc["train_test_gap"] = acc["train_acc"] - acc["test_acc"]
    return {"run": name, "kind": kind, "method": cfg.method.method if kind == "student" else "teacher",
            "seed": cfg.optim.seed, "config": cfg.to_dict(), "accuracy": acc,
            "seconds": metrics.get("seconds"), "metrics": analysis_metrics, "plots": pictures}


def analyze_student_checkpoint(path: Path, dataset: ImageDataset, device: torch.device,
                               teacher: Teacher | None = None, pictures: bool = True,
                               output_root: Path | None = None) -> dict:
    """Analyse a saved student, store the metrics in its checkpoint and the comprehensive results.

    The teacher's test embeddings come from `teacher` when given (and are then stored in the
    checkpoint), else from the checkpoint itself.
    """
    path = Path(path)
    student, ckpt = load_student(path, device)
    cfg = RunConfig.from_dict(ckpt["config"])
    paths = OutputPaths(output_root if output_root is not None else path.parent.parent)
    stored = ckpt.get("analysis") or {}
    teacher_z = stored.get("teacher_test_embeddings")
    if teacher is not None:
        teacher_z = teacher_embeddings(teacher, dataset, device)
    metrics, z = compute_metrics(lambda x: student(x)[1], dataset, device, teacher_z)
    pics = draw_pictures(ckpt["name"], z, dataset, ckpt["log"], paths) if pictures else {}
    ckpt["analysis"] = {"metrics": metrics, "teacher_test_embeddings": teacher_z, "plots": pics}
    atomic_torch_save(path, ckpt)
    update_json_records(comprehensive_results_path(paths, cfg.model.student_arch, cfg.data.dataset),
                        ckpt["name"], _record("student", ckpt["name"], cfg, ckpt["metrics"], metrics, pics))
    log.info(f"[{ckpt['name']}] alignment {metrics['alignment_class']:.4f} "
             f"uniformity {metrics['uniformity']:.4f}")
    return metrics


def analyze_teacher(teacher: Teacher, cfg: RunConfig, teacher_metrics: dict, dataset: ImageDataset,
                    device: torch.device, pictures: bool = True) -> dict:
    """Analyse the teacher (probe-trained head) and record it beside the students."""
    from .config import teacher_run_name
    paths = OutputPaths(cfg.output_dir)
    name = teacher_run_name(cfg, with_projection=True)
    ckpt_path = paths.checkpoint(name)
    ckpt = load_checkpoint(ckpt_path, "teacher_projection")
    if ckpt.get("analysis"):
        metrics = ckpt["analysis"]["metrics"]
        pics = ckpt["analysis"]["plots"]
    else:
        teacher.eval()
        metrics, z = compute_metrics(lambda x: teacher.project(teacher(x)[0]), dataset, device, None)
        pics = draw_pictures(name, z, dataset, [], paths) if pictures else {}
        ckpt["analysis"] = {"metrics": metrics, "plots": pics}
        atomic_torch_save(ckpt_path, ckpt)
    update_json_records(comprehensive_results_path(paths, cfg.model.student_arch, cfg.data.dataset),
                        name, _record("teacher", name, cfg, teacher_metrics, metrics, pics))
    return metrics
