"""Training methods: each turns one batch's model outputs into a dict of named losses; the
training loop sums the dict.

A method is one class in one file of this folder, registered with `@register_method`: its name,
label, settings (flag, run-name tag, help, range, default), what it needs and its losses (the
formulas in `losses.py`). The command line's flags, run names, identities, validation and report
labels are derived from the declarations. Every module of this folder is imported here: the
built-in ones in the order of tables and help texts, then any other file, so adding a method
touches no other module.
"""

from __future__ import annotations

from desupcon.config import MethodConfig
from desupcon.methods.base import (COMPARISONS, comparison_members, import_method_modules, METHODS, Method, Needs,
                                   StepOutputs, declared_settings, logit_term, register_method,
                                   two_stage_phase1_methods, warmup_factor)

import_method_modules()

__all__ = ["COMPARISONS", "comparison_members", "METHODS", "Method", "Needs", "StepOutputs", "build_method",
           "declared_settings", "logit_term", "method_label", "register_method", "two_stage_phase1_methods",
           "warmup_factor"]


def method_label(cfg: MethodConfig) -> str:
    """The method's name in tables, its settings filled in (`Hybrid (lambda 0.3)`)."""
    cls = METHODS.get(cfg.method)
    return cls.label.format(**cfg.to_dict()) if cls else cfg.method


def build_method(cfg: MethodConfig) -> Method:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)
