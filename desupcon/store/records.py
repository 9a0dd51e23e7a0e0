"""The records of an output folder, written here only: each run's training log and its record in
`json_results/comprehensive_results_<student>_<dataset>.json` (SPEC 8: configuration, accuracies,
analysis metrics, probe results, per-image test predictions), and the teacher's test embeddings.

A checkpoint is written once, by the run that trains it; whatever is measured on it afterwards
(the analysis of section 7, the probes) lands here, so a read-only checkpoint can be analysed
and probed, and every record has one form (`build_record`) whoever writes it first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import reprlib
from pathlib import Path

import torch

from desupcon.config import RunConfig, dataset_tag, protocol_of
from desupcon.store.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save, atomic_write_json,
                                       change_json_record, load_checkpoint, read_json)
from desupcon.store.paths import OutputPaths

log = logging.getLogger("desupcon")

ACCURACY_KEYS = ("test_acc", "train_acc", "train_test_gap", "best_test_acc", "best_epoch")


def save_log(paths: OutputPaths, name: str, entries: list[dict]) -> None:
    atomic_write_json(paths.training_log(name), entries)


def records_path(paths: OutputPaths, student_arch: str, dataset: str) -> Path:
    """The records file of the runs of one student architecture on one dataset."""
    return paths.results / f"comprehensive_results_{student_arch}_{dataset_tag(dataset)}.json"


def records_path_of(cfg: RunConfig, root=None) -> Path:
    return records_path(OutputPaths(cfg.output_dir if root is None else root), cfg.model.student_arch,
                        cfg.data.dataset)


def read_record(cfg: RunConfig, name: str, root=None) -> dict | None:
    """The record of run `name` (None: none, or an unreadable records file)."""
    path = records_path_of(cfg, root)
    try:
        return read_json(path).get(name) if path.is_file() else None
    except (CheckpointError, AttributeError):
        return None


def has_record(cfg: RunConfig, name: str) -> bool:
    """Whether the records file of `cfg`'s runs holds the run `name`."""
    return read_record(cfg, name) is not None


def build_record(ckpt: dict, kind: str = "student", analysis: dict | None = None, pictures: dict | None = None,
                 teacher: dict | None = None) -> dict:
    """The record of a run, from its checkpoint (name, configuration, metrics, source) and what was
    measured on it (`analysis`: section 7 metrics; None: not analysed yet)."""
    cfg = RunConfig.from_dict(ckpt["config"])
    m = ckpt.get("metrics") or {}
    acc = {k: m.get(k) for k in ACCURACY_KEYS}
    if acc["train_test_gap"] is None and acc["test_acc"] is not None and acc["train_acc"] is not None:
        acc["train_test_gap"] = acc["train_acc"] - acc["test_acc"]
    two_stage = "two_stage" in ckpt["config"]
    method = "teacher" if kind == "teacher" else "two-stage" if two_stage else cfg.method.method
    record = {"run": ckpt["name"], "kind": kind, "method": method, "seed": cfg.optim.seed,
              "protocol": protocol_of(cfg), "source": (ckpt.get("source") or {}).get("kind", "trained"),
              "teacher": teacher or {"fingerprint": ckpt.get("teacher_fingerprint"), "source": None},
              "config": cfg.to_dict(), "accuracy": acc, "seconds": m.get("seconds"),
              "metrics": analysis or {}}
    if kind == "student":  # (None: a checkpoint written before the toolkit recorded it)
        record["teacher_projection_used"] = m.get("teacher_projection_used")
    if two_stage:  # a two-stage run (two_stage.py): its own settings beside its phase-1 method's
        record["config"]["two_stage"] = ckpt["config"]["two_stage"]
    if pictures is not None:
        record["plots"] = pictures
    return record


def write_record(cfg: RunConfig, name: str, record: dict, root=None) -> None:
    """Write the record of run `name`, keeping its probe results (measured separately)."""
    def replace(old: dict | None) -> dict:
        if old and old.get("probes"):
            return {**record, "probes": old["probes"]}
        return record
    change_json_record(records_path_of(cfg, root), name, replace)


def add_probe_result(ckpt: dict, kind: str, entry: dict, root) -> dict:
    """Add `entry` as `record["probes"][kind]` of the run's record (created from its checkpoint when
    the run has none yet), under the records file's lock; the rest of the record stays as it is."""
    cfg = RunConfig.from_dict(ckpt["config"])

    def add(record: dict | None) -> dict:
        record = record or build_record(ckpt)
        record.setdefault("probes", {})[kind] = entry
        return record
    return change_json_record(records_path_of(cfg, root), ckpt["name"], add)[ckpt["name"]]


CONFIG_SECTIONS = ("data", "model", "method", "optim", "teacher")


def record_problem(record) -> str | None:
    """What makes a stored record unusable by the report (None: nothing): its shape, its kind and
    seed, a configuration that is complete and valid (no section guessed), finite accuracies."""
    from desupcon.config import method_class
    from desupcon.config.validation import checked_config_dict
    if not isinstance(record, dict):
        return f"the record is a {type(record).__name__}, not an object"
    if record.get("kind") not in ("student", "teacher"):
        return f"kind is {reprlib.repr(record.get('kind'))}, not student or teacher"
    seed = record.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        return f"seed is {reprlib.repr(seed)}, not an integer"
    config = record.get("config")
    if not isinstance(config, dict):
        return f"config is {reprlib.repr(config)}, not an object"
    missing = [section for section in CONFIG_SECTIONS if section not in config]
    if missing:
        return f"config has no {', '.join(missing)} section (nothing is guessed for it)"
    try:
        cfg = RunConfig.from_dict(checked_config_dict({k: v for k, v in config.items() if k != "two_stage"},
                                                      "config"))
    except (ValueError, TypeError) as exc:
        return str(exc).splitlines()[0][:200]
    if record["kind"] == "student" and method_class(cfg.method.method) is None:
        return f"method {reprlib.repr(cfg.method.method)} is unknown to this version of desupcon"
    accuracy = record.get("accuracy")
    if not isinstance(accuracy, dict):
        return f"accuracy is {reprlib.repr(accuracy)}, not an object"
    for key in ACCURACY_KEYS:
        value = accuracy.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            return f"accuracy.{key} is {reprlib.repr(value)}, not a finite number"
    if not isinstance(record.get("metrics", {}), dict):
        return "metrics is not an object"
    return None


def records_under(root: Path) -> dict[str, dict]:
    """Every usable record of an output folder, and one (`build_record`, not written) for every
    student checkpoint that has none yet: the report's one source. A records file or record that
    cannot be used is skipped with one line naming the file and what is wrong."""
    root = Path(root)
    records: dict[str, dict] = {}
    for path in sorted((root / "json_results").glob("comprehensive_results_*.json")):
        try:
            stored = read_json(path)
        except CheckpointError as exc:
            log.warning(f"report: skipping {path}: {str(exc).splitlines()[0][:200]}")
            continue
        if not isinstance(stored, dict):
            log.warning(f"report: skipping {path}: it holds a JSON {type(stored).__name__}, not records keyed by "
                        "run name")
            continue
        for name, record in stored.items():
            problem = record_problem(record)
            if problem is None:
                records[name] = record
            else:
                log.warning(f"report: skipping record {reprlib.repr(name)} of {path}: {problem}")
    models = root / "pth_models"
    for path in sorted([*models.glob("*.pth"), *models.glob("imported/*.pth")]):
        if path.stem in records:
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError:
            log.info(
                f"report: skipping {path}: not a desupcon checkpoint (a published file is imported when its "
                "run is trained or analysed: desupcon analyze FILE)")
            continue
        if ckpt.get("kind") == "student":
            records[path.stem] = build_record(ckpt)
    return records


# -- the teacher's test embeddings (the students' analysis compares with them) ------------------

def teacher_embeddings_path(root, teacher_fingerprint: str, data_identity: dict) -> Path:
    """Where the test embeddings of one teacher (by content) on one test set are kept."""
    data = hashlib.sha1(json.dumps(data_identity, sort_keys=True).encode()).hexdigest()[:8]
    return OutputPaths(root).models / "teacher_embeddings" / f"{teacher_fingerprint}_{data}.pth"


def save_teacher_embeddings(root, teacher_fingerprint: str | None, data_identity: dict,
                            embeddings: torch.Tensor) -> None:
    if teacher_fingerprint is None:
        return
    path = teacher_embeddings_path(root, teacher_fingerprint, data_identity)
    if not path.is_file():  # written once: the same teacher gives the same embeddings
        atomic_torch_save(path, {"format": CHECKPOINT_FORMAT, "kind": "teacher_embeddings",
                                 "fingerprint": teacher_fingerprint, "embeddings": embeddings.cpu()})


def load_teacher_embeddings(roots, teacher_fingerprint: str | None, data_identity: dict,
                            rows: int | None = None) -> torch.Tensor | None:
    """The teacher's stored test embeddings from the first of `roots` that has them (None: none).
    A file that names another teacher, or (with `rows`) holds another number of test images, is
    not used."""
    if teacher_fingerprint is None:
        return None
    for root in roots:
        path = teacher_embeddings_path(root, teacher_fingerprint, data_identity)
        if path.is_file():
            stored = load_checkpoint(path, "teacher_embeddings")
            embeddings = stored.get("embeddings")
            if stored.get("fingerprint") != teacher_fingerprint or not isinstance(embeddings, torch.Tensor) \
                    or embeddings.ndim != 2 or (rows is not None and embeddings.shape[0] != rows):
                continue
            return embeddings
    return None
