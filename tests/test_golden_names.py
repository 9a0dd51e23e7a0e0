"""Run names and identities are part of the cache: a restructuring must leave them byte-identical.

`tests/golden_names.json` was written from the code before the structure changed (issue 19);
every experiment of every preset and group, the logit sweep on the 13 pairs, two-stage runs,
probes, the quick start, the teachers, and one run per setting changed from its default are named
and identified here and compared with it. Regenerate it only for a deliberate rename (which
retrains every cached run): `python tests/test_golden_names.py --write`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden_names.json"
FINGERPRINT = "0123456789abcdef"  # a teacher's content fingerprint, fixed for the comparison


def _entry(cfg) -> dict:
    from desupcon.config import run_name, teacher_run_name
    return {"name": run_name(cfg), "identity": cfg.identity(FINGERPRINT),
            "teacher": teacher_run_name(cfg), "teacher_with_projection": teacher_run_name(cfg, True),
            "teacher_identity": cfg.teacher_identity(),
            "teacher_backbone_identity": cfg.teacher_backbone_identity()}


def _changed(value, setting):
    """A value of `setting` other than `value` (only naming is exercised, not validity)."""
    choices = setting.allowed()
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):
        return [*value, 8] if value else [3, 5]
    if value is None:
        return {int: 7, float: 0.25}.get(setting.kind, "weights/some_teacher.pth")
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value * 0.5 + 0.125
    return value + "x"


def _constant_student():
    """A student whose weights do not depend on any random generator (its fingerprint is fixed)."""
    from desupcon.models import Student, build_encoder
    student = Student(build_encoder("resnet8", 10))
    with torch.no_grad():
        for i, tensor in enumerate(student.state_dict().values()):
            if tensor.is_floating_point():
                tensor.copy_(torch.linspace(-1, 1, tensor.numel()).reshape(tensor.shape) * (i + 1) / 7)
    return student


def current() -> dict:
    from desupcon import plan as experiments
    from desupcon.config import pairs
    from desupcon.config import preset
    from desupcon.session import quickstart_configs
    from desupcon.probes import ProbeConfig, probe_identity
    from desupcon.config.settings import all_settings
    from desupcon.two_stage import TwoStageConfig, two_stage_identity, two_stage_name

    out: dict = {}
    for name in ("paper", "paper-bank", "quick", "mdistiller"):
        base = preset(name)
        for group in (*experiments.GROUPS, *experiments.EXTRA_GROUPS):
            for i, e in enumerate(experiments.plan(base, [group], seeds=[0, 3] if group == "baselines" else None)):
                out[f"plan/{name}/{group}/{i}"] = _entry(e.cfg)
        for label, cfg in quickstart_configs(base):
            out[f"quickstart/{name}/{label}"] = _entry(cfg)
    mdistiller = preset("mdistiller")
    for pair in pairs.STANDARD_PAIRS:
        base = mdistiller.with_pair(pair.teacher, pair.student)
        for i, e in enumerate(experiments.plan(base, ["logit"])):
            out[f"pairs/{pair.teacher}:{pair.student}/{i}"] = _entry(e.cfg)
    for base_name, method in (("paper", "lw-supcrd"), ("mdistiller", "dkd"), ("quick", "crd-nce")):
        base = preset(base_name).with_method(method)
        for s in all_settings():
            if s.section in ("data",) and s.field in ("dataset", "data_root", "download"):
                continue
            value = getattr(getattr(base, s.section), s.field)
            if s.field == "method":
                continue
            cfg = base.replace(**{s.section: {s.field: _changed(value, s)}})
            out[f"setting/{base_name}/{s.section}.{s.field}"] = _entry(cfg)
    variants = {"default": TwoStageConfig(),
                "lw-sgd-ft": TwoStageConfig(phase1_method="lw-supcrd", phase1_optimizer="sgd",
                                            finetune_last_stage=True),
                "two-level-p2": TwoStageConfig(two_level_crd=True, phase2=ProbeConfig(epochs=10, lr=3e-4,
                                                                                    temperature=2.0))}
    for base_name in ("paper", "quick", "mdistiller"):
        for label, ts in variants.items():
            if base_name == "mdistiller" and ts.phase1_optimizer == "adam":
                continue
            cfg = preset(base_name)
            out[f"two-stage/{base_name}/{label}"] = {"name": two_stage_name(cfg, ts),
                                                     "identity": two_stage_identity(cfg, ts, FINGERPRINT)}
    student, teacher = _constant_student(), _constant_student()
    cfg = preset("quick")
    for kind, config, k in (("linear", ProbeConfig().resolved("linear"), None), ("knn", None, 20),
                            ("kd", ProbeConfig(epochs=5).resolved("kd", 3), None)):
        out[f"probe/{kind}"] = probe_identity(kind, student, cfg, config, teacher=teacher, k=k)
    return json.loads(json.dumps(out, sort_keys=True))  # tuples as lists, as the file holds them


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def now() -> dict:
    return current()


def test_every_golden_entry_is_still_produced(golden, now):
    assert sorted(now) == sorted(golden)


@pytest.mark.parametrize("prefix", ["plan/", "quickstart/", "pairs/", "setting/", "two-stage/", "probe/"])
def test_names_and_identities_are_byte_identical(golden, now, prefix):
    keys = [k for k in golden if k.startswith(prefix)]
    assert keys, f"no golden entries under {prefix}"
    changed = [k for k in keys if json.dumps(now.get(k), sort_keys=True) != json.dumps(golden[k], sort_keys=True)]
    assert not changed, f"{len(changed)} of {len(keys)} changed, e.g. {changed[0]}: {now.get(changed[0])} " \
                        f"!= {golden[changed[0]]}"


def test_the_settings_variants_name_distinct_runs(golden):
    """The golden file itself is meaningful: changing any tagged setting renames the run."""
    from desupcon.config.settings import all_settings
    base_names = {golden["plan/paper/baselines/3"]["name"]}
    for s in all_settings():
        entry = golden.get(f"setting/paper/{s.section}.{s.field}")
        if entry and s.tag and s.section != "teacher":
            assert entry["name"] not in base_names, s.name


if __name__ == "__main__" and "--write" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    GOLDEN.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(current())} entries)")
