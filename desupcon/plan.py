"""The published experiment plan as data (SPEC section 6), sweeps over it, and seeds.

Each group is a list of run configurations derived from one base configuration (a preset plus
any overrides). Running a group trains only the runs that are missing: finished runs load from
their checkpoints, interrupted ones resume from their epoch checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from desupcon.analysis import plots
from desupcon.config import bank_protocol, dataset_tag, default_bank_size, run_name, RunConfig
from desupcon.engine import distributed
from desupcon.engine.run import RunResult
from desupcon.methods import COMPARISONS, comparison_members, method_label
from desupcon.report import write_report
from desupcon.session import Session


ALPHAS = (1.0, 2.0, 5.0, 10.0)
BETAS = (1.0, 5.0, 10.0, 12.0)
TEMPERATURES = (0.05, 0.07)
LAMBDAS = (0.3, 0.5, 0.7, 0.9)
GROUPS = ("baselines", "alpha", "beta", "temp", "lambda", "bank")  # the published plan (`all`)
# Comparisons beyond the published plan, declared by the methods (methods.COMPARISONS: the logit
# distillers, the feature distillers), each on the base's teacher/student pair and protocol.
EXTRA_GROUPS = tuple(COMPARISONS)


@dataclass(frozen=True)
class Experiment:
    """One planned run: its group, the swept setting's label and value, and the configuration."""

    group: str
    label: str
    value: float | str
    cfg: RunConfig


def _lw(base: RunConfig, **method) -> RunConfig:
    return base.replace(method={"method": "lw-supcrd", "alpha": 1.0, "beta": 10.0,
                                "temperature": 0.07, "bank_size": 0, **method})


def group_plan(base: RunConfig, group: str) -> list[Experiment]:
    """The runs of one group of the published plan, derived from `base`."""
    bank = default_bank_size(base.preset)
    if group == "baselines":
        configs = [base.replace(method={"method": "ce", "bank_size": 0}),
                   base.replace(method={"method": "crd", "bank_size": 0, "temperature": 0.07}),
                   base.replace(method={"method": "supcon", "temperature": 0.07}), _lw(base)]
        return [Experiment(group, method_label(c.method), c.method.method, c) for c in configs]
    if group == "alpha":
        return [Experiment(group, f"alpha {a}", a, _lw(base, alpha=a)) for a in ALPHAS]
    if group == "beta":
        return [Experiment(group, f"beta {b}", b, _lw(base, beta=b)) for b in BETAS]
    if group == "temp":
        return [Experiment(group, f"tau {t}", t, _lw(base, temperature=t)) for t in TEMPERATURES]
    if group == "lambda":
        return [Experiment(group, f"lambda {lam}", lam,
                           _lw(base).replace(method={"method": "hybrid", "lam": lam})) for lam in LAMBDAS]
    if group == "bank":  # under its own protocol: paper-bank for the paper preset (SPEC 6)
        bank_base = bank_protocol(base)
        configs = [bank_base.replace(method={"method": method, "bank_size": k, "temperature": 0.07,
                                             "alpha": 1.0, "beta": 10.0})
                   for method in ("crd", "lw-supcrd") for k in (0, bank)]
        return [Experiment(group, method_label(c.method) + (" + bank" if c.method.bank_size else ""),
                           f"{c.method.method}/{c.method.bank_size}", c) for c in configs]
    if group in COMPARISONS:  # on the base's teacher/student pair, under the base's protocol
        return [Experiment(group, method_label(cfg.method), method, cfg)
                for method, cfg in ((m, base.with_method(m)) for m in comparison_members(group))]
    raise ValueError(f"unknown sweep group {group!r}; known: {', '.join(GROUPS + EXTRA_GROUPS)}, all")


def with_seeds(experiments: list[Experiment], seeds: list[int] | None) -> list[Experiment]:
    """Every experiment once per seed (None keeps each configuration's own seed)."""
    if not seeds:
        return experiments
    return [Experiment(e.group, e.label, e.value, e.cfg.replace(optim={"seed": s}))
            for s in seeds for e in experiments]


def plan(base: RunConfig, groups: list[str] | str = "all", seeds: list[int] | None = None) -> list[Experiment]:
    """The experiments of the requested groups (duplicates across groups appear once each group)."""
    names = list(GROUPS) if groups == "all" else [groups] if isinstance(groups, str) else list(groups)
    return with_seeds([e for g in names for e in group_plan(base, g)], seeds)


def shard_plan(experiments: list[Experiment], shard: tuple[int, int] | None,
               lockstep: bool = False, lockstep_size: int | None = None) -> list[Experiment]:
    """The I-th of N disjoint parts of a plan (`shard=(I, N)`, 1-based).

    The units are the distinct runs, or with `lockstep` pieces of lockstep groups (runs sharing
    data, seed, batch, epochs and teacher) of at most `lockstep_size` runs each; by default whole
    groups, or, when there are fewer groups than parts, pieces of ceil(runs / N) so that every part
    gets work. In order of first appearance the units go to parts 1, 2, ..., N, 1, ... So N
    processes (or SLURM array tasks) with I = 1..N train every run exactly once. A part keeps every
    experiment of its runs (a run listed in two groups appears in both).
    """
    if shard is None:
        return experiments
    index, count = shard
    names = list(dict.fromkeys(run_name(e.cfg) for e in experiments))
    if lockstep:
        groups: dict = {}
        for e in experiments:
            members = groups.setdefault(e.cfg.lockstep_key(), [])
            if run_name(e.cfg) not in members:
                members.append(run_name(e.cfg))
        size = lockstep_size or (max(len(m) for m in groups.values()) if len(groups) >= count
                                 else -(-len(names) // count))
        piece = {name: (key, i // size) for key, members in groups.items() for i, name in enumerate(members)}
    order: dict = {}
    for name in names:
        order.setdefault(piece[name] if lockstep else name, len(order))
    return [e for e in experiments
            if order[piece[run_name(e.cfg)] if lockstep else run_name(e.cfg)] % count == index - 1]


def run_experiments(base: RunConfig, experiments: list[Experiment], force: bool = False,
                    force_groups: tuple[str, ...] = (), lockstep: bool = False,
                    session: Session | None = None, resume: bool = True) -> list[tuple[Experiment, RunResult]]:
    """Train the missing runs (each distinct run once), analyse them and return results in order.

    `force` retrains every student run; `force_groups` retrains only those groups (e.g. the bank
    ablation). Either retrains a run at most once per session, and never the teacher (that is the
    session's `force_teacher`). With `lockstep`, runs sharing a seed train together so the teacher
    forward is shared. `resume=False` ignores epoch checkpoints (the teacher's too) and starts over.
    """
    session = session or Session(base)
    session.teacher(resume=resume)
    session.analyze_teacher()
    by_name: dict[str, RunResult] = {}
    unique: dict[str, tuple[RunConfig, bool]] = {}
    for e in experiments:
        name = run_name(e.cfg)
        forced = force or e.group in force_groups
        prev = unique.get(name)
        unique[name] = (e.cfg, forced or (prev[1] if prev else False))
    for forced in (True, False):
        cfgs = [cfg for cfg, f in unique.values() if f is forced]
        if not cfgs:
            continue
        if lockstep:
            results = session.run_many(cfgs, force=forced, resume=resume, lockstep=True)
        else:
            results = [session.run(cfg, force=forced, resume=resume) for cfg in cfgs]
        by_name.update({r.name: r for r in results})
    return [(e, by_name[run_name(e.cfg)]) for e in experiments]


def plot_group(base: RunConfig, group: str, results: list[tuple[Experiment, RunResult]]) -> str | None:
    """Accuracy, class alignment and uniformity against the swept value (mean over seeds)."""
    if group in ("baselines", "bank", *COMPARISONS):
        return None
    points: dict[float, list[RunResult]] = {}
    for e, r in results:
        if e.group == group:
            points.setdefault(float(e.value), []).append(r)
    values = sorted(points)

    def series(key, source):
        out = []
        for v in values:
            vals = [source(r).get(key) for r in points[v]]
            vals = [x for x in vals if x is not None]
            out.append(sum(vals) / len(vals) if vals else None)
        return out

    accuracy = series("test_acc", lambda r: r.metrics)
    alignment = series("alignment_class", lambda r: r.analysis or {})
    uniformity = series("uniformity", lambda r: r.analysis or {})
    xlabel = {"alpha": "alpha", "beta": "beta", "temp": "temperature tau", "lambda": "lambda"}[group]
    name = f"sweep_{group}_{base.model.student_arch}_{dataset_tag(base.data.dataset)}_{base.preset}"
    path = plots.plot_sweep(values, {"test accuracy %": accuracy, "alignment (class)": alignment,
                                     "uniformity": uniformity},
                            Path(base.output_dir) / "plots" / f"{name}.png",
                            xlabel=xlabel, title=f"{group} sweep ({base.preset} preset)")
    return str(path)


def sweep(base: RunConfig, groups: str | list[str] = "all", seeds: list[int] | None = None,
          force: bool = False, force_bank: bool = False, force_teacher: bool = False, lockstep: bool = False,
          pictures: bool = True, resume: bool = True, shard: tuple[int, int] | None = None,
          lockstep_size: int | None = None) -> tuple[list, str]:
    """Run sweep groups (`all` = the whole plan), plot them and write the report.

    `pictures=False` skips the per-run pictures (metrics are always computed); `resume=False`
    ignores epoch checkpoints and starts interrupted runs over; `shard=(I, N)` runs only the I-th
    of N disjoint parts of the plan (`shard_plan`).
    """
    experiments = shard_plan(plan(base, groups, seeds), shard, lockstep, lockstep_size)
    results = run_experiments(base, experiments, force=force,
                              force_groups=("bank",) if force_bank else (), lockstep=lockstep,
                              session=Session(base, pictures=pictures, force_teacher=force_teacher),
                              resume=resume)
    if not distributed.is_main():  # several processes: the first one plots and reports
        return results, ""
    for group in sorted({e.group for e in experiments}):
        plot_group(base, group, results)
    text, _ = write_report(base.output_dir)
    return results, text
