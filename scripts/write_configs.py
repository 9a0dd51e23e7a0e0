"""Write configs/: one YAML configuration per published table and per standard pair (SPEC 9, 12,
13, 17), each derived from the presets and the pair table, so the files never drift from the code.

    python scripts/write_configs.py            # (re)write configs/
    python scripts/write_configs.py --check    # exit 1 if a shipped file differs from what it would write

Each file is one run's configuration, loadable with `--config FILE` by `train` (that run) and by
`sweep` (the table's sweep on that base); its header says which command reproduces the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from desupcon.config import PAPER_BANK_SIZE, preset  # noqa: E402
from desupcon.config.pairs import STANDARD_PAIRS  # noqa: E402
from desupcon.store.weights import RELEASED  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _published_tables() -> dict[str, tuple[str, dict]]:
    """{file name: (what it reproduces and how, configuration as plain data)}."""
    paper = preset("paper")
    lw = paper.replace(method={"method": "lw-supcrd", "alpha": 1.0, "beta": 10.0, "temperature": 0.07})
    bank = preset("paper-bank").replace(method={"method": "lw-supcrd", "bank_size": PAPER_BANK_SIZE})
    sdd = preset("mdistiller").replace(model={"teacher_weights": RELEASED}).with_method("sdd-lskd")
    from desupcon.probes import ProbeConfig
    from desupcon.two_stage import TwoStageConfig
    two_stage = preset("mdistiller").with_pair("ResNet34", "ResNet18").with_method("crd")
    stage_settings = TwoStageConfig(phase1_method="crd", phase1_optimizer="sgd",
                                    phase2=ProbeConfig(epochs=50, batch_size=64, schedule="constant"))
    return {
        "paper_main.yaml": ("SPEC 9's main table (LW-SupCRD alpha 1, beta 10, tau 0.07 and the baselines): "
                            "`sweep baselines --config configs/paper_main.yaml`; its alpha, beta and tau "
                            "sweeps: `sweep alpha|beta|temp --config configs/paper_main.yaml`", lw.to_dict()),
        "paper_hybrid.yaml": ("SPEC 9's hybrid sweep (lambda 0.3 here): `sweep lambda --config "
                              "configs/paper_hybrid.yaml`", lw.replace(method={"method": "hybrid", "lam": 0.3}).to_dict()),
        "paper_bank.yaml": ("SPEC 9's memory-bank ablation (LW-SupCRD + bank 4096 here): `sweep bank "
                            "--config configs/paper_bank.yaml`", bank.to_dict()),
        "sdd_lskd.yaml": ("seed 003's table (SDD-LSKD, resnet32x4 -> resnet8x4, the released teacher): "
                          "`sweep logit --config configs/sdd_lskd.yaml`", sdd.to_dict()),
        "two_stage.yaml": ("seed 004's table (two-stage, CRD phase 1 with the seed's SGD, ResNet34 -> ResNet18, "
                           "the teacher trained): `train --config configs/two_stage.yaml`; end-to-end KD beside it: "
                           "`train --config configs/two_stage.yaml --method kd`",
                           {**two_stage.to_dict(), "two_stage": stage_settings.to_dict()}),
    }


def _pairs() -> dict[str, tuple[str, dict]]:
    out = {}
    for p in STANDARD_PAIRS:
        cfg = (preset("mdistiller").replace(model={"teacher_weights": RELEASED})
               .with_pair(p.teacher, p.student).with_method("dkd"))
        published = f"published KD {p.kd} / CRD {p.crd}" + (f" / DKD {p.dkd}" if p.dkd else "")
        out[f"pairs/{p.teacher}-{p.student}.yaml"] = (
            f"SPEC 17's pair {p.teacher} -> {p.student} (DKD here; {published}, best epoch): `train --config "
            f"configs/pairs/{p.teacher}-{p.student}.yaml`, every logit distiller: `sweep logit --config ...`",
            cfg.to_dict())
    return out


def rendered() -> dict[str, str]:
    """{path under configs/: file text}."""
    out = {}
    for name, (what, data) in {**_published_tables(), **_pairs()}.items():
        header = "# " + what + "\n# Written by scripts/write_configs.py from the presets; edit a copy, not this file.\n"
        out[name] = header + yaml.safe_dump(data, sort_keys=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files, write nothing")
    args = parser.parse_args()
    stale = []
    for name, text in rendered().items():
        path = CONFIGS / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print(f"configs/ differs from the presets in: {', '.join(stale)}; run scripts/write_configs.py")
        return 1
    print(f"configs/: {len(rendered())} files {'checked' if args.check else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
