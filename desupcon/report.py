"""Results tables from what is on disk, grouped like the published tables, with seed statistics.

Records come from `json_results/comprehensive_results_*.json` (one per analysed run) plus any
student checkpoint in `pth_models/` that has no record yet. Runs that differ only in their seed form
one configuration: tables show mean, standard deviation and the number of seeds, and a paired
difference (mean +- standard error over the shared seeds) against the table's reference run.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import atomic_write_text, load_checkpoint, read_json
from .config import RunConfig

# SPEC section 9: CIFAR-100, ResNet-50 -> ResNet-18, 50 epochs, one seed.
# (table, configuration) -> (test acc %, class alignment, uniformity)
PUBLISHED = {
    ("main", "teacher"): (80.75, 0.5928, -3.4649),
    ("main", "lw-supcrd bank"): (75.63, 0.8336, -3.5073),
    ("main", "lw-supcrd"): (73.35, 1.1990, -3.7104),
    ("main", "crd bank"): (69.56, 0.8098, -2.0739),
    ("main", "supcon"): (69.08, 0.4377, -2.5665),
    ("main", "crd"): (68.10, 0.90, -2.24),  # published as 68.05 to 68.15
    ("main", "ce"): (67.93, 0.6631, -1.7332),
    ("bank", "lw-supcrd"): (74.76, 1.0835, -3.7314),
    ("bank", "lw-supcrd bank"): (75.63, 0.8336, -3.5073),
    ("bank", "crd"): (68.10, 0.90, -2.24),
    ("bank", "crd bank"): (69.56, 0.8098, -2.0739),
    **{("alpha", a): (acc, None, None) for a, acc in ((1.0, 73.19), (2.0, 71.78), (5.0, 70.67), (10.0, 70.07))},
    **{("beta", b): (acc, None, None) for b, acc in ((1.0, 70.46), (5.0, 70.63), (10.0, 73.19), (12.0, 71.31))},
    **{("temp", t): (acc, None, None) for t, acc in ((0.05, 68.08), (0.07, 73.19))},
    **{("lambda", l): (acc, None, None) for l, acc in ((0.3, 72.58), (0.5, 72.07), (0.7, 71.57), (0.9, 70.69))},
}


def is_published_protocol(cfg: RunConfig) -> bool:
    o = cfg.optim
    return (cfg.data.dataset == "cifar100" and cfg.data.train_subset is None
            and cfg.model.teacher_arch == "resnet50" and cfg.model.student_arch == "resnet18"
            and o.epochs == 50 and o.batch_size == 128 and o.lr == 1e-3 and o.weight_decay == 1e-4)


@dataclass
class Configuration:
    """All seeds of one configuration."""

    label: str
    cfg: RunConfig
    kind: str
    records: dict[int, dict] = field(default_factory=dict)  # seed -> record

    def values(self, key: str) -> dict[int, float]:
        out = {}
        for seed, r in self.records.items():
            v = r["accuracy"].get(key) if key in ("test_acc", "train_acc", "train_test_gap") \
                else (r.get("metrics") or {}).get(key)
            if v is not None:
                out[seed] = v
        return out


def _seedless_key(record: dict) -> str:
    cfg = dict(record["config"])
    cfg = json.loads(json.dumps(cfg))
    cfg["optim"].pop("seed", None)
    for k in ("device", "output_dir", "compile"):
        cfg.pop(k, None)
    cfg["data"].pop("data_root", None)
    cfg["data"].pop("download", None)
    if record["kind"] == "student":
        cfg["method"] = RunConfig.from_dict(record["config"]).method.relevant()
    return record["kind"] + json.dumps(cfg, sort_keys=True)


def _strip_seed(name: str, seed: int) -> str:
    return name.replace(f"_seed{seed}", "")


def load_records(root: str | Path) -> dict[str, dict]:
    """Every analysed run under `root` (keyed by run name), plus unanalysed student checkpoints."""
    root = Path(root)
    records: dict[str, dict] = {}
    for path in sorted((root / "json_results").glob("comprehensive_results_*.json")):
        records.update(read_json(path))
    for path in sorted((root / "pth_models").glob("*.pth")):
        if path.stem in records:
            continue
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != "student":
            continue
        cfg = RunConfig.from_dict(ckpt["config"])
        m = ckpt["metrics"]
        records[path.stem] = {"run": path.stem, "kind": "student", "method": cfg.method.method,
                              "seed": cfg.optim.seed, "config": ckpt["config"],
                              "accuracy": {k: m.get(k) for k in ("test_acc", "train_acc", "train_test_gap")},
                              "seconds": m.get("seconds"),
                              "metrics": (ckpt.get("analysis") or {}).get("metrics") or {}}
    return records


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
    ("bank", "Memory bank ablation", None,
     lambda c: c.kind == "student" and (c.cfg.method.method == "crd" and c.cfg.method.temperature == 0.07
                                        or c.cfg.method.method == "lw-supcrd" and _defaults(c.cfg.method))),
]
REFERENCE = {"main": lambda c: c.kind == "student" and c.cfg.method.method == "ce",
             "alpha": lambda c: c.cfg.method.alpha == 1.0, "beta": lambda c: c.cfg.method.beta == 10.0,
             "temp": lambda c: c.cfg.method.temperature == 0.07, "lambda": lambda c: c.cfg.method.lam == 0.5,
             "bank": lambda c: c.cfg.method.method == "lw-supcrd" and not c.cfg.method.bank_size}


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
             "hybrid bank"]
    return order.index(_tag(c)), c.label


def _row_label(table: str, key: str | None, c: Configuration) -> str:
    if key is not None:
        return f"{key} = {getattr(c.cfg.method, key)}"
    if c.kind == "teacher":
        return f"teacher {c.cfg.model.teacher_arch}"
    m = c.cfg.method
    label = {"ce": "CE student", "supcon": "SupCon", "crd": "CRD", "lw-supcrd": "LW-SupCRD",
             "hybrid": f"Hybrid (lambda {m.lam})"}[m.method]
    return label + (f" + bank {m.bank_size}" if m.bank_size and m.method in ("crd", "lw-supcrd", "hybrid") else "")


def _published(table: str, key: str | None, c: Configuration):
    if not is_published_protocol(c.cfg) or (c.kind == "student" and (
            not c.cfg.method.adaptive_beta or c.cfg.method.kd_temperature != 1.0)):
        return None
    if key is not None:
        return PUBLISHED.get((table, float(getattr(c.cfg.method, key))))
    return PUBLISHED.get((table, _tag(c)))


def render_table(table: str, title: str, key: str | None, configs: list[Configuration]) -> str:
    ref = next((c for c in configs if c.kind == "student" and REFERENCE[table](c)), None)
    ref_label = _row_label(table, key, ref) if ref else None
    header = ["run", "seeds", "test acc %", "train acc %", "gap", "alignment (class)", "uniformity",
              "alignment (instance)", f"Δ test acc vs {ref_label} (paired)" if ref else "Δ (paired)",
              "published acc / align / unif"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if key is not None:
        configs = sorted(configs, key=lambda c: getattr(c.cfg.method, key))
    else:
        configs = sorted(configs, key=_main_order)
    for c in configs:
        acc = c.values("test_acc")
        cells = [_row_label(table, key, c), str(len(c.records)),
                 _fmt(*mean_sd(list(acc.values()))), _fmt(*mean_sd(list(c.values("train_acc").values()))),
                 _fmt(*mean_sd(list(c.values("train_test_gap").values()))),
                 _fmt(*mean_sd(list(c.values("alignment_class").values())), digits=4),
                 _fmt(*mean_sd(list(c.values("uniformity").values())), digits=4),
                 _fmt(*mean_sd(list(c.values("alignment_instance").values())), digits=4)]
        if ref is not None and c is not ref and c.kind == "student":
            d, se, n = paired_difference(acc, ref.values("test_acc"))
            cells.append(f"{_fmt(d, se)} (n={n})" if n else "no shared seeds")
        else:
            cells.append("")
        pub = _published(table, key, c)
        cells.append(" / ".join("" if v is None else f"{v:g}" for v in pub) if pub else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_report(root: str | Path, tables: list[str] | None = None) -> str:
    """The Markdown report of every run under `root`, one section per student/dataset.

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
           "Last-epoch test accuracy of the online linear classifier; mean ± sd over seeds. "
           "Δ is the mean paired difference over shared seeds ± its standard error. Published "
           "figures (SPEC 9, single seed) appear beside runs of the published protocol.", ""]
    for (student, dataset, preset_name), configs in sorted(by_setting.items()):
        out += [f"## {student} on {dataset} ({preset_name} preset)", ""]
        for table, title, key, member in TABLES:
            if tables is not None and table not in tables:
                continue
            chosen = [c for c in configs if member(c)]
            if chosen:
                out += [render_table(table, title, key, chosen), ""]
        if tables is None:
            out += ["### Every run", ""] + [f"- `{name}`" for c in configs for name in
                                            sorted(r["run"] for r in c.records.values())] + [""]
    return "\n".join(out)


def write_report(root: str | Path) -> tuple[str, Path]:
    text = build_report(root)
    path = Path(root) / "json_results" / "results.md"
    atomic_write_text(path, text)
    return text, path
