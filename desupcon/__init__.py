"""desupcon: logit-weighted supervised contrastive representation distillation (LW-SupCRD), and the
literature's logit and feature distillers, on one training engine.

What a script or notebook uses is importable from here; each name loads its module on first use,
so `import desupcon` itself stays light:

    import desupcon
    cfg = desupcon.preset("quick").with_method("kd")
    result = desupcon.Session(cfg).run(cfg)
    print(desupcon.build_report(cfg.output_dir))
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("desupcon")  # declared once, in pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_PUBLIC = {
    # configurations
    "RunConfig": "desupcon.config", "MethodConfig": "desupcon.config", "preset": "desupcon.config",
    "PRESETS": "desupcon.config", "run_name": "desupcon.config",
    # training, sweeps and seeds, the report
    "Session": "desupcon.session", "quickstart": "desupcon.session", "analyze_checkpoint": "desupcon.session",
    "sweep": "desupcon.plan", "run_experiments": "desupcon.plan", "Experiment": "desupcon.plan",
    "build_report": "desupcon.report",
    # trained models, and comparing two of them
    "load_student": "desupcon.store.cache", "compare_models": "desupcon.analysis.compare_models",
    "layer_similarity": "desupcon.analysis.compare_models",
    "build_encoder": "desupcon.models", "Student": "desupcon.models", "Teacher": "desupcon.models",
    # adding a method
    "Method": "desupcon.methods", "Needs": "desupcon.methods", "StepOutputs": "desupcon.methods",
    "register_method": "desupcon.methods", "method_setting": "desupcon.config.settings",
    "StageNeeds": "desupcon.models",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # (the next lookup is a plain attribute)
        return value
    raise AttributeError(f"module 'desupcon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
