"""BatchNorm folded into the convolution before it, for a frozen model in eval mode.

An eval-mode BatchNorm is an affine map per channel, y = g (x - mu) / sqrt(v + eps) + beta, so after
a convolution W x + b it folds into one convolution with W' = W s and b' = (b - mu) s + beta,
s = g / sqrt(v + eps): one kernel instead of two, the same function. Which BatchNorm follows which
convolution is read from one forward pass (a BatchNorm whose input is exactly a convolution's
output), not from the module names, so every architecture of the registry is handled; the folded
copy is checked against the original on that pass and discarded if they differ.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger("desupcon")


def conv_batchnorm_pairs(model: nn.Module, forward, example: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names where the BatchNorm's input is the convolution's output,
    from one `forward(model, example)`; a module met more than once is left out."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    calls: dict[str, int] = {}
    hooks = []

    def after_conv(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            produced[id(output)] = (name, output)  # the tensor is kept: its id is not reused
        return hook

    def before_bn(name):
        def hook(module, inputs):
            calls[name] = calls.get(name, 0) + 1
            found = produced.get(id(inputs[0]))
            if found is not None and found[1] is inputs[0]:
                pairs.append((found[0], name))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv(name)))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(before_bn(name)))
    try:
        with torch.no_grad():
            forward(model, example)
    finally:
        for h in hooks:
            h.remove()
    convs = [c for c, _ in pairs]
    return [(c, b) for c, b in pairs if calls[c] == 1 and calls[b] == 1 and convs.count(c) == 1]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _folded(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    folded = copy.deepcopy(model).eval()
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        _replace(folded, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace(folded, bn_name, nn.Identity())
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def _same_outputs(forward, a: nn.Module, b: nn.Module, example: torch.Tensor, rtol: float) -> bool:
    with torch.no_grad():
        want, got = forward(a, example), forward(b, example)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    return all(bool((x.float() - y.float()).abs().max() <= rtol * x.float().abs().max().clamp_min(1e-6))
               for x, y in zip(want, got))


def fold_batchnorm(model: nn.Module, forward, example: torch.Tensor, rtol: float = 1e-4
                   ) -> tuple[nn.Module, int]:
    """(a copy of `model` in eval mode with its convolution -> BatchNorm pairs folded, pairs folded).
    `forward(model, x)` returns a tensor or a tuple of tensors. A pair whose fold changes the
    outputs on `example` by more than `rtol` of their scale (the convolution's output is also read
    elsewhere, e.g. by a residual sum) is left unfolded; with none left, the original is returned."""
    model.eval()
    pairs = conv_batchnorm_pairs(model, forward, example)
    folded = _folded(model, pairs)
    if not _same_outputs(forward, model, folded, example, rtol):
        kept: list[tuple[str, str]] = []
        for pair in pairs:  # one at a time: keep the folds that leave the function as it is
            if _same_outputs(forward, model, _folded(model, [*kept, pair]), example, rtol):
                kept.append(pair)
        log.info(f"BatchNorm folding: {len(pairs) - len(kept)} of {len(pairs)} convolution outputs are also "
                 "read elsewhere; those BatchNorms stay")
        pairs, folded = kept, _folded(model, kept)
    return (folded, len(pairs)) if pairs else (model, 0)
