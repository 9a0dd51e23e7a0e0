"""High-level workflow shared by the CLI and the notebook: data, teacher and runs in one session.

A `Session` loads the dataset and the teacher once and trains (or loads from cache) any number of
student runs on them; the quick start is a session on the `quick` preset.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from desupcon.analysis import evaluate as evaluation
from desupcon.config import default_bank_size, preset, run_name, RunConfig, teacher_run_name
from desupcon.config.validation import validate_config
from desupcon.data import ImageDataset
from desupcon.engine import distributed
from desupcon.engine.dataset import prepare_dataset
from desupcon.engine.devices import DevicePolicy, select_device
from desupcon.engine.run import RunResult
from desupcon.engine.students import train_students
from desupcon.models import Teacher
from desupcon.report import write_report
from desupcon.store.cache import import_published_student
from desupcon.store.checkpoint import atomic_write_json, atomic_write_text, CheckpointError, load_checkpoint
from desupcon.store.locks import RunLock
from desupcon.store.paths import OutputPaths
from desupcon.store.published import published_config
from desupcon.store.records import has_record
from desupcon.teacher import load_or_train_teacher, teacher_from_state, teacher_ready, teacher_state


log = logging.getLogger("desupcon")


class Session:
    """Dataset, device and teacher for runs that share them (same data and teacher identity)."""

    def __init__(self, cfg: RunConfig, analyze: bool = True, pictures: bool = True,
                 force_teacher: bool = False, policy: DevicePolicy | None = None):
        self.cfg = cfg
        # several processes (torchrun): only the first analyses and writes
        self.analyze_requested = analyze
        self.analyze_runs, self.pictures = analyze and distributed.is_main(), pictures
        self.force_teacher = force_teacher  # the teacher's own switch, applied at its first load
        # One device policy for everything this session runs (tests pass any policy on the CPU).
        self.policy = policy or DevicePolicy.choose(select_device(cfg.device), cfg.precision,
                                                    cfg.deterministic)
        self.device = self.policy.device
        self.policy.apply_global_settings()
        self.paths = OutputPaths(cfg.output_dir)
        self._dataset: ImageDataset | None = None
        self._teacher: tuple[Teacher, dict] | None = None
        # Runs retrained by force in this session: forcing retrains each at most once.
        self.retrained: set[str] = set()
        self.trained_count = 0  # student runs actually trained (not loaded) in this session

    @property
    def dataset(self) -> ImageDataset:
        if self._dataset is None:
            self._dataset = prepare_dataset(self.cfg, self.device)
        return self._dataset

    def teacher(self, resume: bool = True, projection: bool = True) -> tuple[Teacher, dict]:
        """The teacher, loaded (or trained) once per session; its projection head probe-trained
        unless `projection` is False (no run reads it: the probe is left out, until a later call
        asks for the head)."""
        if self._teacher is not None and projection and not getattr(self._teacher[0], "head_probed", True):
            self._teacher = None  # the backbone is cached on disk: only the probe runs now
        if self._teacher is None:
            validate_config(self.cfg, self.dataset)
            # one process trains (or probes) a teacher; another one on this folder waits and loads it
            lock = None if distributed.active() else RunLock(self.paths.run_lock(teacher_run_name(self.cfg, True)))
            if lock is not None and not lock.acquire(wait=False):
                log.info("the teacher is being trained by another process; waiting for it to finish")
                lock.acquire(wait=True)
            try:
                self._teacher = self._load_or_train_teacher(resume, projection)
            finally:
                if lock is not None:
                    lock.release(finished=self._teacher is not None)
        return self._teacher

    def _load_or_train_teacher(self, resume: bool, projection: bool) -> tuple[Teacher, dict]:
        """Several processes: a teacher rank 0 has ready (cached or published) is loaded there and
        sent to the others (their disks may not hold it); one to train trains on every rank."""
        ready = not self.force_teacher and distributed.active() and distributed.broadcast_from_main(
            teacher_ready(self.cfg) if distributed.is_main() else None)
        if not ready:
            return load_or_train_teacher(self.cfg, self.dataset, self.policy, force=self.force_teacher,
                                         resume=resume, projection=projection)
        loaded = None
        if distributed.is_main():
            with distributed.solo():  # nothing trains: rank 0 loads it alone, then sends it
                loaded = load_or_train_teacher(self.cfg, self.dataset, self.policy, projection=projection)
        state = distributed.broadcast_from_main(teacher_state(*loaded) if loaded else None)
        return loaded or teacher_from_state(state, self.cfg, self.dataset.num_classes, self.policy)

    def _check_compatible(self, cfg: RunConfig) -> None:
        if cfg.teacher_identity() != self.cfg.teacher_identity() or \
                cfg.data_identity() != self.cfg.data_identity():
            raise ValueError("this session's dataset/teacher differ from the run's; start a new "
                             "Session for that configuration")

    def run_many(self, cfgs: list[RunConfig], force: bool = False, resume: bool = True,
                 lockstep: bool = True) -> list[RunResult]:
        """Train (or load) several runs; with `lockstep` compatible runs share teacher forwards.

        `force` retrains the runs not already retrained by force in this session (never the
        teacher: that is `force_teacher`)."""
        for cfg in cfgs:  # every setting checked before anything trains
            self._check_compatible(cfg)
            validate_config(cfg, self.dataset)
        # The analysis compares every student with the teacher, so it is loaded even for CE runs;
        # its projection head is probed only when a run reads it (the analysis then uses it too).
        # (the same on every rank: a teacher that trains needs them all, even if only rank 0 analyses)
        needs_teacher = self.analyze_requested or any(c.uses_teacher for c in cfgs)
        projection = any(c.reads_teacher_projection for c in cfgs)
        teacher = self.teacher(resume=resume, projection=projection)[0] if needs_teacher else None
        forced = [force and run_name(c) not in self.retrained for c in cfgs]
        results: dict[int, RunResult] = {}
        groups: dict[tuple, list[int]] = {}
        for i, cfg in enumerate(cfgs):
            key = (cfg.lockstep_key(), forced[i]) if lockstep else (i,)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            group = train_students([cfgs[i] for i in members], self.dataset, teacher,
                                         self.policy, force=forced[members[0]], resume=resume)
            results.update(zip(members, group))
            self.trained_count += len({r.name for r in group if not r.cached})
            if forced[members[0]]:
                self.retrained.update(r.name for r in group)
        ordered = [results[i] for i in range(len(cfgs))]
        if self.analyze_runs:
            for result in ordered:
                self.analyze(result)
        return ordered

    def analyze(self, result: RunResult, force: bool = False) -> dict:
        """Section 7 metrics (and pictures) of a finished run, computed once and stored."""
        if not self.analyze_runs:  # several processes: only the first analyses (and writes)
            return result.analysis or {}
        # a record lost (a kill while the records file was written) is rebuilt from the checkpoint
        if result.analysis is None or force or not has_record(result.config, result.name):
            result.analysis = evaluation.analyze_student_checkpoint(
                result.checkpoint, self.dataset, self.policy, self._analysis_teacher(result), self.pictures)
        return result.analysis

    def _analysis_teacher(self, result: RunResult) -> Teacher:
        """The teacher as this session has it: with a probed head when one was needed or is cached,
        else the backbone alone (the semantic-agreement metrics are then left out)."""
        if self._teacher is not None:
            return self._teacher[0]
        return self.teacher(projection=result.config.reads_teacher_projection)[0]

    def analyze_teacher(self) -> dict:
        """The teacher's own record (its probe-trained head's space included). Left out when this
        session's runs never read the head, so it was not probed: the analysis probes nothing."""
        if self._teacher is not None and not getattr(self._teacher[0], "head_probed", True):
            log.info("the teacher's projection head was not probed (no run here reads it): the teacher's "
                     "own analysis is left out")
            return {}
        teacher, metrics = self.teacher()
        if not self.analyze_runs:  # several processes: only the first analyses (and writes)
            return {}
        return evaluation.analyze_teacher(teacher, self.cfg, metrics, self.dataset, self.policy,
                                          self.pictures)

    def run(self, cfg: RunConfig, force: bool = False, resume: bool = True) -> RunResult:
        return self.run_many([cfg], force, resume)[0]


def analyze_checkpoint(path: str | Path, device: str = "auto", output_dir: str | Path = ".",
                       data_root: str | None = None, pictures: bool = True) -> dict:
    """Re-analyse a saved student on its own dataset, writing under `output_dir`.

    `path` is one of our checkpoints or a published student file (SPEC 11): a published one is
    imported first (or its earlier import reused), an unknown name as an unnamed ResNet-18 student.
    """
    path = Path(path)
    dev = select_device(device)
    try:  # the file first: a bad file is named before any dataset is looked for
        ckpt = load_checkpoint(path, expected_kind="student")
        published = False
    except CheckpointError:
        from desupcon.store.weights import is_plain_state_dict_file
        if _is_desupcon_checkpoint(path) or not is_plain_state_dict_file(path):
            raise
        published = True
    if published:
        described = published_config(path.stem)
        cfg = described or preset("paper")
    else:
        cfg = RunConfig.from_dict(ckpt["config"])
    cfg = cfg.replace(device=device, output_dir=str(output_dir),
                      data={"data_root": data_root} if data_root else {})
    dataset = prepare_dataset(cfg, dev)
    if published:
        models = path.parent if path.parent.name == "pth_models" else Path(output_dir) / "pth_models"
        path, _ = import_published_student(path, described, None, dataset, dev, models)
    return evaluation.analyze_student_checkpoint(path, dataset, dev, teacher=None,
                                                 pictures=pictures, output_root=Path(output_dir))


def _is_desupcon_checkpoint(path: Path) -> bool:
    try:
        load_checkpoint(path)
    except CheckpointError:
        return False
    return True


def report(output_dir: str | Path = ".") -> tuple[str, Path]:
    """Build the Markdown results tables from disk; returns (text, path written)."""
    return write_report(output_dir)


def quickstart_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """One run per method, plus LW-SupCRD with a memory bank."""
    bank = default_bank_size(cfg.preset)
    variants = [("ce", {}), ("supcon", {}), ("crd", {}), ("lw-supcrd", {}), ("hybrid", {}),
                (f"lw-supcrd + bank {bank}", {"method": "lw-supcrd", "bank_size": bank})]
    out = []
    for label, changes in variants:
        method = {"method": changes.get("method", label), "bank_size": changes.get("bank_size", 0)}
        out.append((label, cfg.replace(method=method)))
    return out


def results_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table; `columns` are (key, header) pairs (percentages 2 decimals, metrics 4)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def quickstart(cfg: RunConfig, force: bool = False, force_teacher: bool = False,
               resume: bool = True) -> list[dict]:
    """Teacher, then one student per method, then a results table (printed and saved).
    `resume=False` ignores epoch checkpoints and starts interrupted runs over."""
    started = time.perf_counter()
    session = Session(cfg, force_teacher=force_teacher)
    _, teacher_metrics = session.teacher(resume=resume)
    labelled = quickstart_configs(cfg)
    results = session.run_many([c for _, c in labelled], force=force, resume=resume)
    rows = [{"method": "teacher " + cfg.model.teacher_arch, "test_acc": teacher_metrics["test_acc"],
             "train_acc": teacher_metrics.get("train_acc"), "seconds": None, "run": "teacher"}]
    rows[0].update(session.analyze_teacher())
    for (label, _), result in zip(labelled, results):
        rows.append({"method": label, "test_acc": result.metrics["test_acc"],
                     "train_acc": result.metrics["train_acc"], "seconds": result.metrics["seconds"],
                     "run": result.name, **(result.analysis or {})})
    table = results_table(rows, [("method", "method"), ("test_acc", "test acc %"),
                                 ("train_acc", "train acc %"), ("seconds", "train seconds (an equal share of the lockstep group)"),
                                 ("alignment_class", "alignment (class)"), ("uniformity", "uniformity")])
    if not distributed.is_main():  # several processes: the first one writes and prints
        return rows
    out = session.paths.results
    atomic_write_json(out / "quickstart_results.json", rows)
    atomic_write_text(out / "quickstart_results.md", table + "\n")
    print("\n" + table)
    _, report_path = write_report(cfg.output_dir)
    print(f"\nfull report (grouped tables, seeds): {report_path}")
    print(f"\nquick start finished in {time.perf_counter() - started:.0f} s; "
          f"outputs under {Path(cfg.output_dir).resolve()}")
    return rows
