"""Results tables from what is on disk, grouped like the published tables, with seed statistics.

Records come from `json_results/comprehensive_results_*.json` (one per analysed run) plus any
student checkpoint in `pth_models/` that has no record yet. Runs that differ only in their seed form
one configuration: tables show mean, standard deviation and the number of seeds, and a paired
difference (mean +- standard error over the shared seeds) against the table's reference run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import statistics

from desupcon.config import HUB_TEACHER, protocol_of, RunConfig
from desupcon.config.pairs import published_epoch, published_figures
from desupcon.methods import COMPARISONS, comparison_members, method_label
from desupcon.store.checkpoint import atomic_write_text
from desupcon.store.published import PUBLISHED_SOURCE
from desupcon.store.records import records_under


# SPEC section 9: CIFAR-100, ResNet-50 -> ResNet-18, 50 epochs, one seed (42), the published teacher.
# (protocol, table, configuration) -> (test acc %, train acc %, class alignment, uniformity)
_SWEEP_POINT = (73.19, None, 1.1518, -3.7027)  # alpha 1, beta 10, tau 0.07 in the sweeps
PUBLISHED = {
    ("paper", "main", "teacher"): (80.75, None, 0.5928, -3.4649),
    ("paper", "main", "lw-supcrd"): (73.35, None, 1.1990, -3.7104),
    ("paper", "main", "supcon"): (69.08, None, 0.4377, -2.5665),
    ("paper", "main", "crd"): (68.05, None, 0.9008, -2.2358),
    ("paper", "main", "ce"): (67.93, None, 0.6631, -1.7332),
    ("paper-bank", "bank", "lw-supcrd bank"): (75.63, 95.72, 0.8336, -3.5073),
    ("paper-bank", "bank", "lw-supcrd"): (74.76, 89.72, 1.0835, -3.7314),
    ("paper-bank", "bank", "crd bank"): (69.56, 78.57, 0.8098, -2.0739),
    ("paper-bank", "bank", "crd"): (68.15, 73.70, 0.9162, -2.2804),
    ("paper", "alpha", 1.0): _SWEEP_POINT, ("paper", "alpha", 2.0): (71.78, None, 1.1129, -3.6744),
    ("paper", "alpha", 5.0): (70.67, None, 1.1589, -3.6712),
    ("paper", "alpha", 10.0): (70.07, None, 1.2754, -3.6728),
    ("paper", "beta", 1.0): (70.46, None, 1.1862, -3.6390), ("paper", "beta", 5.0): (70.63, None, 1.2487, -3.6785),
    ("paper", "beta", 10.0): _SWEEP_POINT, ("paper", "beta", 12.0): (71.31, None, 1.2068, -3.6654),
    ("paper", "temp", 0.05): (68.08, None, 1.3503, -3.6645), ("paper", "temp", 0.07): _SWEEP_POINT,
    **{("paper", "lambda", lam): (acc, None, None, None)
       for lam, acc in ((0.3, 72.58), (0.5, 72.07), (0.7, 71.57), (0.9, 70.69))},
}
PUBLISHED_TEACHER_SOURCES = (HUB_TEACHER, PUBLISHED_SOURCE)



def mdistiller_protocol(cfg: RunConfig) -> bool:
    """The mdistiller protocol on any teacher/student pair (SPEC 13 and 17)."""
    return cfg.preset == "mdistiller" and protocol_of(cfg, any_pair=True) == "mdistiller"


def has_published_teacher(record: dict) -> bool:
    """Whether the run was distilled from (or is) the published teacher: loaded from the hub id or
    from a published teacher file (its content fingerprint is recorded beside)."""
    return (record.get("teacher") or {}).get("source") in PUBLISHED_TEACHER_SOURCES


@dataclass
class Configuration:
    """All seeds of one configuration."""

    label: str
    cfg: RunConfig
    kind: str
    records: dict[int, dict] = field(default_factory=dict)  # seed -> record

    def values(self, key: str, space: str = "projection") -> dict[int, float]:
        out = {}
        for seed, r in self.records.items():
            if key in ("test_acc", "train_acc", "train_test_gap", "best_test_acc"):
                v = r["accuracy"].get(key)
            elif key.startswith("probe:"):  # probe:<kind>:<top1|top5>
                _, kind, which = key.split(":")
                v = ((r.get("probes") or {}).get(kind) or {}).get(which)
            else:
                metrics = r.get("metrics") or {}
                v = (metrics.get("backbone") or {}).get(key) if space == "backbone" else metrics.get(key)
            if v is not None:
                out[seed] = v
        return out

    @property
    def first(self) -> dict:
        return next(iter(self.records.values()))

    @property
    def method(self) -> str:
        """The method as recorded (two-stage runs keep their phase-1 method in the config)."""
        return self.first.get("method") or self.cfg.method.method

    @property
    def protocol(self) -> str:
        return protocol_of(self.cfg)

    @property
    def teacher(self) -> str:
        t = self.first.get("teacher") or {}
        if self.kind == "student" and not self.cfg.uses_teacher:
            return "none"
        source = t.get("source") or "?"
        source = {HUB_TEACHER: "published (hub)", PUBLISHED_SOURCE: "published (file)"}.get(source, source)
        return f"{source} {t['fingerprint'][:8]}" if t.get("fingerprint") else source


def _seedless_key(record: dict) -> str:
    """What makes two records seeds of one configuration: the run's identity (every setting that
    can change its result, `RunConfig.identity`) without the seed, and the same teacher and
    source. Runtime settings (device, precision, --save-every, trackers) never split a row."""
    cfg = RunConfig.from_dict(record["config"])
    teacher = (record.get("teacher") or {}).get("fingerprint")
    identity = cfg.seedless_identity(teacher) if record["kind"] == "student" else cfg.teacher_identity()
    extra = {"kind": record["kind"], "recorded_method": record.get("method"),
             "two_stage": record["config"].get("two_stage"), "source": record.get("source"),
             "teacher_fingerprint": teacher}
    return json.dumps({"identity": identity, **extra}, sort_keys=True, default=str)


def _strip_seed(name: str, seed: int) -> str:
    return name.replace(f"_seed{seed}", "")


def load_records(root: str | Path) -> dict[str, dict]:
    """Every analysed run under `root` (keyed by run name), plus unanalysed student checkpoints of
    ours (imported published ones included). Any other `.pth` is skipped with one line saying so."""
    return records_under(Path(root))


def group_configurations(records: dict[str, dict]) -> list[Configuration]:
    groups: dict[str, Configuration] = {}
    for name, r in sorted(records.items()):
        key = _seedless_key(r)
        if key not in groups:
            groups[key] = Configuration(_strip_seed(name, r["seed"]), RunConfig.from_dict(r["config"]), r["kind"])
        groups[key].records[r["seed"]] = r
    return list(groups.values())


# -- table membership ---------------------------------------------------------------------------

def _defaults(m) -> bool:
    return m.alpha == 1.0 and m.beta == 10.0 and m.temperature == 0.07


def _tag(c: Configuration) -> str:
    if c.kind == "teacher":
        return "teacher"
    m = c.cfg.method
    return m.method + (" bank" if m.bank_size and m.method != "supcon" and m.method != "ce" else "")


def _two_stage(c) -> bool:
    return c.method == "two-stage"


TABLES = [
    ("main", "Main results", None,
     lambda c: c.kind == "teacher" or c.cfg.method.method in ("ce", "supcon") and c.cfg.method.temperature == 0.07
     or c.cfg.method.method == "crd" and c.cfg.method.temperature == 0.07
     or c.cfg.method.method == "lw-supcrd" and _defaults(c.cfg.method)
     or c.cfg.method.method == "hybrid" and c.cfg.method.lam == 0.5 and _defaults(c.cfg.method)),
    ("alpha", "LW-SupCRD alpha sweep (beta 10, tau 0.07, no bank)", "alpha",
     lambda c: c.kind == "student" and c.cfg.method.method == "lw-supcrd" and not c.cfg.method.bank_size
     and c.cfg.method.beta == 10.0 and c.cfg.method.temperature == 0.07),
    ("beta", "LW-SupCRD beta sweep (alpha 1, tau 0.07, no bank)", "beta",
     lambda c: c.kind == "student" and c.cfg.method.method == "lw-supcrd" and not c.cfg.method.bank_size
     and c.cfg.method.alpha == 1.0 and c.cfg.method.temperature == 0.07),
    ("temp", "LW-SupCRD temperature sweep (alpha 1, beta 10, no bank)", "temperature",
     lambda c: c.kind == "student" and c.cfg.method.method == "lw-supcrd" and not c.cfg.method.bank_size
     and c.cfg.method.alpha == 1.0 and c.cfg.method.beta == 10.0),
    ("lambda", "Hybrid lambda sweep (lambda SupCon + (1 - lambda) LW-SupCRD)", "lam",
     lambda c: c.kind == "student" and c.cfg.method.method == "hybrid" and not c.cfg.method.bank_size),
    *((name, comparison.title, None, lambda c, name=name: c.kind == "student"
       and c.cfg.method.method in comparison_members(name)  # (read when used: methods registered later count)
       and (c.cfg.method.method != "lw-supcrd" or _defaults(c.cfg.method) and not c.cfg.method.bank_size))
      for name, comparison in COMPARISONS.items()),
    ("two-stage", "Two-stage distillation and end-to-end references (SPEC 12; probes on frozen features)", None,
     lambda c: c.kind == "student" and (_two_stage(c) or c.cfg.method.method in ("kd", "crd", "crd-nce", "ce"))),
    ("bank", "Memory bank ablation", None,
     lambda c: c.kind == "student" and (c.cfg.method.method == "crd" and c.cfg.method.temperature == 0.07
                                        or c.cfg.method.method == "lw-supcrd" and _defaults(c.cfg.method))),
]
REFERENCE = {"main": lambda c: c.kind == "student" and c.cfg.method.method == "ce",
             "alpha": lambda c: c.cfg.method.alpha == 1.0, "beta": lambda c: c.cfg.method.beta == 10.0,
             "temp": lambda c: c.cfg.method.temperature == 0.07, "lambda": lambda c: c.cfg.method.lam == 0.5,
             "bank": lambda c: c.cfg.method.method == "lw-supcrd" and not c.cfg.method.bank_size,
             **{name: lambda c, ref=comparison.reference: c.cfg.method.method == ref
                for name, comparison in COMPARISONS.items()},
             "two-stage": lambda c: c.cfg.method.method == "kd" and not _two_stage(c)}


# -- statistics ---------------------------------------------------------------------------------

def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float | None, float | None, int]:
    """Mean of a - b over the seeds both have, its standard error, and the number of pairs."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return None, None, 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se, len(diffs)


def _fmt(mean, sd=None, digits=2) -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _main_order(c: Configuration) -> tuple:
    order = ["teacher", "ce", "supcon", "crd", "crd bank", "lw-supcrd", "lw-supcrd bank", "hybrid",
             "hybrid bank", *dict.fromkeys(m for name in COMPARISONS for m in comparison_members(name)[1:])]
    tag = _tag(c)
    return (order.index(tag) if tag in order else len(order)), c.label


def _row_label(table: str, key: str | None, c: Configuration) -> str:
    if key is not None:
        return f"{key} = {getattr(c.cfg.method, key)}"
    if c.kind == "teacher":
        return f"teacher {c.cfg.model.teacher_arch}"
    m = c.cfg.method
    label = method_label(m)
    if getattr(m, "logit_term", "none") != "none":
        label += f" + {m.logit_term.upper()}"
    if _two_stage(c):
        label = f"two-stage ({label} phase 1, KD probe)"
    return label + (f" + bank {m.bank_size}" if m.bank_size and m.method in ("crd", "lw-supcrd", "hybrid") else "")


def _published(table: str, key: str | None, c: Configuration):
    """The SPEC 9 figures for this row, only for a run of the same protocol distilled from (or
    being) the published teacher, with the published method settings."""
    if table in COMPARISONS:
        if not mdistiller_protocol(c.cfg):
            return None
        # each figure marked with the epoch its source reports (RepDistiller's last, the others best)
        figures = published_figures(c.cfg.model.teacher_arch, c.cfg.model.student_arch)
        m = c.cfg.method
        if m.method == "sd-kd" and list(m.sdd_scales) != [1, 2]:
            return None  # the published SD-KD used M = [1, 2]
        which = "teacher" if c.kind == "teacher" else m.method
        acc = figures.get(which)
        return None if acc is None else (acc, None, None, None, published_epoch(which))
    protocol = c.protocol
    if protocol not in ("paper", "paper-bank") or not has_published_teacher(c.first):
        return None
    m = c.cfg.method
    if c.kind == "student" and (not m.adaptive_beta or m.kd_temperature != 1.0 or m.bank_mode != "class-aware"
                                or m.method == "hybrid" and m.hybrid_scaling != "running"):
        return None
    if key is not None:
        return PUBLISHED.get((protocol, table, float(getattr(m, key))))
    if c.kind == "student" and m.method == "lw-supcrd" and not _defaults(m):
        return None
    return PUBLISHED.get((protocol, table, _tag(c)))


def _published_cell(pub) -> str:
    if not pub:
        return ""
    acc, train, align, unif, *epoch = pub
    parts = [f"{acc:g}" + (f" (train {train:g})" if train is not None else "")
             + (f" ({epoch[0]} epoch)" if epoch and epoch[0] else "")]
    parts += ["" if v is None else f"{v:g}" for v in (align, unif)]
    return " / ".join(parts)


DELTA_COLUMN = "Δ test acc (paired)"  # named after the table's reference row when it has one
HEADER = ["run", "seeds", "test acc % (last epoch)", "best-epoch test acc %", "train acc %", "gap",
          "alignment (class, proj)", "uniformity (proj)", "alignment (instance, proj)",
          "alignment (class, backbone)", "uniformity (backbone)", DELTA_COLUMN,
          "published acc / align / unif", "protocol", "teacher", "source",
          "linear probe top-1 / top-5", "k-NN top-1 / top-5", "KD probe top-1",
          "superclass margin (proj / backbone)", "nearest centroid in own superclass % (proj / backbone)",
          "agreement with teacher %", "McNemar p (exact, per shared seed)", "collapsed (seeds)"]


def teacher_agreement(c: Configuration, setting: list[Configuration]) -> dict[int, float]:
    """Per seed, the percentage of test images on which the student predicts its teacher's class
    (the teacher found by the fingerprint the student records)."""
    fingerprint = (c.first.get("teacher") or {}).get("fingerprint")
    teacher = next((t for t in setting if t.kind == "teacher" and fingerprint
                    and (t.first.get("teacher") or {}).get("fingerprint") == fingerprint
                    and t.first.get("test_predictions")), None)
    if c.kind != "student" or teacher is None:
        return {}
    ref, ref_labels = teacher.first["test_predictions"], teacher.first.get("test_labels")
    return {seed: 100 * sum(a == b for a, b in zip(r["test_predictions"], ref)) / len(ref)
            for seed, r in c.records.items()
            if r.get("test_predictions") and r.get("test_labels") == ref_labels}


def mcnemar_against(c: Configuration, other: Configuration) -> dict[int, float]:
    """Per shared seed, the exact McNemar p-value of `c` against `other` on the same test images
    (both records' labels must be the same list)."""
    from desupcon.analysis.compare import error_overlap, mcnemar_exact
    out = {}
    for seed in sorted(set(c.records) & set(other.records)):
        mine, theirs = c.records[seed], other.records[seed]
        a, b, labels = mine.get("test_predictions"), theirs.get("test_predictions"), mine.get("test_labels")
        if not (a and b and labels) or labels != theirs.get("test_labels") or len(a) != len(b):
            continue
        table = error_overlap(a, b, labels)
        out[seed] = mcnemar_exact(table["only_a_right"], table["only_b_right"])
    return out


def _mcnemar_reference(table: str, c: Configuration, configs: list[Configuration],
                       setting: list[Configuration]) -> Configuration | None:
    """Two-stage rows: the end-to-end run of the same encoder (phase-1 method); others: the CE
    student of the same data and protocol."""
    if c.kind != "student":
        return None
    if table == "two-stage" and _two_stage(c):
        return next((o for o in configs if not _two_stage(o) and o.kind == "student"
                     and o.cfg.method.method == c.cfg.method.method), None)
    if c.cfg.method.method == "ce":
        return None
    return next((o for o in setting if o.kind == "student" and o.cfg.method.method == "ce" and not _two_stage(o)
                 and o.protocol == c.protocol and o.cfg.data_identity() == c.cfg.data_identity()), None)


def render_table(table: str, title: str, key: str | None, configs: list[Configuration],
                 setting: list[Configuration] | None = None) -> str:
    ref = next((c for c in configs if c.kind == "student" and REFERENCE[table](c)), None)
    setting = setting if setting is not None else configs  # where the teacher and CE rows are found
    if key is not None:
        configs = sorted(configs, key=lambda c: (getattr(c.cfg.method, key), c.label))
    elif table in COMPARISONS:  # the members' declared order, the teacher first
        members = comparison_members(table)
        configs = sorted(configs, key=lambda c: (c.kind != "teacher", members.index(c.cfg.method.method)
                                                 if c.cfg.method.method in members else len(members), c.label))
    else:
        configs = sorted(configs, key=_main_order)
    labels = [_row_label(table, key, c) for c in configs]
    # Rows of different configurations never share a label: repeated ones add the run's name.
    labels = [f"{lab} [{c.label}]" if labels.count(lab) > 1 else lab for lab, c in zip(labels, configs)]
    ref_label = labels[configs.index(ref)] if ref else None
    header = list(HEADER)
    if ref:
        header[header.index(DELTA_COLUMN)] = f"Δ test acc vs {ref_label} (paired)"
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, c in zip(labels, configs):
        acc = c.values("test_acc")

        def stat(k, digits=2, space="projection"):
            return _fmt(*mean_sd(list(c.values(k, space).values())), digits=digits)
        cells = [label, str(len(c.records)), stat("test_acc"), stat("best_test_acc"), stat("train_acc"),
                 stat("train_test_gap"), stat("alignment_class", 4), stat("uniformity", 4),
                 stat("alignment_instance", 4), stat("alignment_class", 4, "backbone"),
                 stat("uniformity", 4, "backbone")]
        if ref is not None and c is not ref and c.kind == "student":
            d, se, n = paired_difference(acc, ref.values("test_acc"))
            cells.append(f"{_fmt(d, se)} (n={n})" if n else "no shared seeds")
        else:
            cells.append("")
        cells += [_published_cell(_published(table, key, c)), c.protocol, c.teacher,
                  c.first.get("source") or "trained"]
        for kind, both in (("linear", True), ("knn", True), ("kd", False)):
            top1 = stat(f"probe:{kind}:top1")
            cells.append(top1 + (f" / {stat(f'probe:{kind}:top5')}" if both and top1 else ""))
        for key_, scale, digits in (("superclass_margin", 1, 4), ("superclass_nearest_rate", 100, 1)):
            pair = [_fmt(*mean_sd([scale * v for v in c.values(key_, space).values()]), digits=digits)
                    for space in ("projection", "backbone")]
            cells.append(" / ".join(pair) if any(pair) else "")
        cells.append(_fmt(*mean_sd(list(teacher_agreement(c, setting).values()))))
        other = _mcnemar_reference(table, c, configs, setting)
        p_values = mcnemar_against(c, other) if other is not None else {}
        cells.append(", ".join(f"{p:.2g}" for p in p_values.values()) + f" vs {_row_label(table, None, other)}"
                     if p_values else "")
        collapsed = {seed: r["collapsed"] for seed, r in c.records.items() if r.get("collapsed")}
        cells.append("; ".join(f"seed {seed}: {reasons[0].split(' (')[0]}" for seed, reasons in collapsed.items()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_report(root: str | Path, tables: list[str] | None = None) -> str:
    """The Markdown report of every run under `root`, one section per student/dataset/preset.

    `tables` restricts it to some of: main, alpha, beta, temp, lambda, bank.
    """
    records = load_records(root)
    if not records:
        return "No runs found under " + str(Path(root).resolve()) + " (train some first).\n"
    by_setting: dict[tuple, list[Configuration]] = {}
    for c in group_configurations(records):
        setting = (c.cfg.model.student_arch, c.cfg.data.dataset, c.cfg.preset)
        by_setting.setdefault(setting, []).append(c)
    out = ["# Results", "",
           "Test accuracy of the online linear classifier (the CE student's own classifier) at the "
           "last epoch, the headline; the best epoch (chosen on the test set) is shown separately "
           "and is never the result. Mean ± sd over seeds; Δ is the mean paired difference over "
           "shared seeds ± its standard error. Geometry is measured on the test set in two spaces: "
           "the projection head (proj, as in the published tables; a CE student's projector never "
           "trains, so its proj figures describe a random projection of its features) and the "
           "normalised backbone features. Published figures (SPEC 9, one seed, last epoch) appear "
           "only beside runs of the same protocol distilled from the published teacher.", ""]
    for (student, dataset, preset_name), configs in sorted(by_setting.items()):
        out += [f"## {student} on {dataset} ({preset_name} preset)", ""]
        for table, title, key, member in TABLES:
            if tables is not None and table not in tables:
                continue
            chosen = [c for c in configs if member(c) and (table == "two-stage" or not _two_stage(c))]
            if table == "two-stage" and not any(_two_stage(c) for c in chosen):
                continue  # no two-stage run among these
            if table in COMPARISONS and all(c.cfg.method.method in COMPARISONS[table].context for c in chosen):
                continue  # none of the compared methods among these runs, only its context
            if chosen:
                out += [render_table(table, title, key, chosen, configs), ""]
        if tables is None:
            out += ["### Every run", ""] + [f"- `{name}`" for c in configs for name in
                                            sorted(r["run"] for r in c.records.values())] + [""]
    return "\n".join(out)


def write_report(root: str | Path) -> tuple[str, Path]:
    text = build_report(root)
    path = Path(root) / "json_results" / "results.md"
    atomic_write_text(path, text)
    return text, path
