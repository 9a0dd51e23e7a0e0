"""Training students: cached runs loaded, one process per run (locks), the rest trained in
lockstep and saved."""

from __future__ import annotations

import logging

from desupcon import data as data_mod
from desupcon.config import run_name, RunConfig
from desupcon.config.validation import validate_config
from desupcon.engine import distributed as dist
from desupcon.engine.build import make_student_run
from desupcon.engine.devices import as_policy
from desupcon.engine.finite import NonFiniteLossError
from desupcon.engine.loop import train_group
from desupcon.engine.run import final_metrics, RunResult
from desupcon.models import Teacher, teacher_identity_fingerprint
from desupcon.store.cache import is_published, result_from_checkpoint, find_cached_run
from desupcon.store.checkpoint import atomic_torch_save, remove_partial, remove_stale_temporaries_in
from desupcon.store.locks import RunLock
from desupcon.store.paths import check_output_dirs, OutputPaths
from desupcon.store.published import PUBLISHED_SOURCE

log = logging.getLogger("desupcon")


def train_students(cfgs: list[RunConfig], dataset: data_mod.ImageDataset, teacher: Teacher | None,
                   policy, force: bool = False, resume: bool = True) -> list[RunResult]:
    """Train student configurations that share data order and teacher in lockstep.

    Cached runs (same name, same identity) and published checkpoints of the same run are loaded,
    not trained. Runs with an epoch checkpoint resume from it unless `resume` is False. Returns
    results in the order given.
    """
    if not cfgs:
        return []
    policy = as_policy(policy)
    keys = {c.lockstep_key() for c in cfgs}
    if len(keys) != 1:
        raise ValueError("lockstep training needs the same dataset, seed, batch size, epochs and "
                         "teacher for every run; train such groups separately")
    for cfg in cfgs:
        validate_config(cfg, dataset)
    paths = OutputPaths(cfgs[0].output_dir)
    check_output_dirs(paths)
    results: dict[str, RunResult] = {}
    pending: list[RunConfig] = []

    def fingerprint_for(cfg: RunConfig) -> str | None:
        return teacher_identity_fingerprint(teacher, cfg.reads_teacher_projection)
    locks: dict[str, RunLock] = {}  # the runs this process has claimed
    saved: set[str] = set()

    def load_finished(cfg: RunConfig) -> bool:
        found = None
        if not force and dist.is_main():
            found = find_cached_run(cfg, paths, fingerprint_for(cfg), dataset, policy)
        if dist.active():  # rank 0 decides for all (the others' disks may not hold the file)
            found = dist.broadcast_from_main(None if found is None else (
                found[0], {k: found[1].get(k) for k in ("name", "metrics", "log", "source")}))
        if found is None:
            return False
        path, ckpt = found
        log.info(f"[{run_name(cfg)}] loaded from {'a ' + PUBLISHED_SOURCE if is_published(ckpt) else 'cache'}"
                 f": test acc {ckpt['metrics']['test_acc']:.2f}%")
        stale = paths.partial_checkpoint(run_name(cfg))
        if stale.is_file() and not dist.active():  # a kill between the final save and its clean-up
            if run_name(cfg) in locks:  # ours already
                remove_partial(paths, run_name(cfg))
            else:
                lock = RunLock(paths.run_lock(run_name(cfg)))
                if lock.acquire(wait=False):  # (not while another process retrains it by force)
                    remove_partial(paths, run_name(cfg))
                    lock.release(finished=True)
        results[run_name(cfg)] = result_from_checkpoint(cfg, path, ckpt, cached=True)
        return True

    for cfg in cfgs:
        name = run_name(cfg)
        if not load_finished(cfg) and name not in results and all(run_name(p) != name for p in pending):
            pending.append(cfg)

    # One process per run (run_locks): claim what is free now, wait for the rest afterwards. Under
    # torchrun the ranks train together and nothing is claimed.

    def claim(cfg: RunConfig, wait: bool) -> bool:
        if dist.active():
            return True
        lock = RunLock(paths.run_lock(run_name(cfg)))
        if lock.acquire(wait):
            locks[run_name(cfg)] = lock
            return True
        return False

    failures: list[NonFiniteLossError] = []
    try:
        now = [cfg for cfg in pending if claim(cfg, wait=False)]
        later = [cfg for cfg in pending if run_name(cfg) not in locks and not dist.active()]
        # a run claimed now may have been finished by another process since the look above
        now = [cfg for cfg in now if not load_finished(cfg)]
        failures += _train_and_save(now, dataset, teacher, policy, paths, results, saved, resume, force)
        for cfg in later:
            log.info(f"[{run_name(cfg)}] is being trained by another process; waiting for it to finish")
            claim(cfg, wait=True)
        retry = [cfg for cfg in later if not load_finished(cfg)]  # its process died: resume it here
        failures += _train_and_save(retry, dataset, teacher, policy, paths, results, saved, resume, force)
    finally:
        for name, lock in locks.items():
            lock.release(finished=name in saved or name in results)
    if dist.is_main():
        remove_stale_temporaries_under(paths)
    if failures:  # the other runs are finished and saved; report every run that went bad
        if len(failures) == 1:
            raise failures[0]
        raise NonFiniteLossError("\n".join(str(f) for f in failures), failures[0].name,
                                 failures[0].epoch, failures[0].step)
    return [results[run_name(c)] for c in cfgs]


def remove_stale_temporaries_under(paths: OutputPaths) -> None:
    """Temporary files of killed writes in every output folder, removed once a run completes."""
    for folder in (paths.models, paths.models / "in_progress", paths.results, paths.results / "training_logs"):
        remove_stale_temporaries_in(folder)


def _train_and_save(cfgs: list[RunConfig], dataset, teacher, policy, paths: OutputPaths,
                    results: dict[str, RunResult], saved: set[str], resume: bool, force: bool) -> list:
    """Train `cfgs` in lockstep and save each finished run (rank 0); returns the failures."""
    if not cfgs:
        return []
    runs = [make_student_run(cfg, dataset, teacher, policy) for cfg in cfgs]
    finished, failures = train_group(runs, dataset, teacher, paths, resume=resume and not force,
                                     save_every=cfgs[0].save_every)
    for run in finished:
        ckpt = run.final_checkpoint(final_metrics(run.log, run.epoch))
        if dist.is_main():
            atomic_torch_save(paths.checkpoint(run.name), ckpt)
            remove_partial(paths, run.name)
        dist.barrier()
        saved.add(run.name)
        results[run.name] = result_from_checkpoint(run.cfg, paths.checkpoint(run.name), ckpt, False)
    return failures
