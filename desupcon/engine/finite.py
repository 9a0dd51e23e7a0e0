"""Non-finite losses, gradients and weights: detected on the device, reported with run, epoch
and step."""

from __future__ import annotations

from pathlib import Path

import torch

from desupcon.errors import DesupconError


class NonFiniteLossError(DesupconError, RuntimeError):
    """Training produced NaN/inf; the message names the run, epoch and step."""

    def __init__(self, message: str, name: str = "", epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.name, self.epoch, self.step = name, epoch, step


LIKELY_CAUSES = ("Likely causes: learning rate too high (--lr), temperature too small "
                 "(--temperature), or a large alpha (--alpha).")


def non_finite_error(name: str, what: str, epoch: int, step: int) -> NonFiniteLossError:
    return NonFiniteLossError(f"run {name}: non-finite {what} at epoch {epoch}, step {step}. "
                              f"{LIKELY_CAUSES}", name, epoch, step)


def check_finite(value: torch.Tensor, name: str, epoch: int, step: int, what: str = "loss") -> None:
    value = value.detach()
    if not bool(torch.isfinite(value).all()):
        shown = f" ({float(value)})" if value.numel() == 1 else ""
        raise non_finite_error(name, f"{what}{shown}", epoch, step)


def grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A device bool: every gradient of the optimiser's parameters is finite (no host sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    # The max-norm is finite iff every element is (NaN propagates; no overflow as with the 2-norm).
    return torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()


def params_finite(modules) -> bool:
    tensors = [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())
               if t.is_floating_point()]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


def with_kept_state(exc: NonFiniteLossError, partial: Path, last_good_epoch: int) -> NonFiniteLossError:
    """The error, completed with where the last good state of the run is."""
    if last_good_epoch >= 1 and partial.is_file():
        kept = (f"The last good state (after epoch {last_good_epoch}) is kept in {partial}; nothing "
                "non-finite was saved.")
    else:
        kept = "No epoch of this run had finished, so nothing was saved for it."
    return NonFiniteLossError(f"{exc} {kept}", exc.name, exc.epoch, exc.step)
