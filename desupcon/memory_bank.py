"""Momentum memory bank of teacher embeddings (SPEC section 5).

One unit-vector slot per training image plus its label. After each step every image of the batch
updates its slot with the mean of its views' detached teacher embeddings:

    slot <- normalise(m * slot + (1 - m) * mean_views(t))

Slots start at zero, so the first write stores normalise(mean_views(t)). Each step draws K slots
uniformly without replacement from the slots written at least once, excluding the current batch
(or, in the published README's reading, from all slots).

The bookkeeping (which slots are written, which are drawn) lives on the CPU with a CPU generator, so
sampling never waits for the GPU and is identical on every device; the embeddings stay on the
training device. For a step replayed as a CUDA graph the host work is done before the step
(`stage_step`) and the step itself only gathers and writes on the device (`gather`, `write`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from desupcon.engine.devices import to_device


@dataclass
class BankStep:
    """One step's bank work decided on the host (`MomentumMemoryBank.stage_step`), on the device."""

    chosen: torch.Tensor  # (K,) slots drawn for the step's loss
    slots: torch.Tensor  # (U,) slots the step's update writes
    inverse: torch.Tensor  # (R,) the update's rows -> position in `slots`
    counts: torch.Tensor  # (U,) rows averaged into each slot

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.chosen, self.slots, self.inverse, self.counts


class MomentumMemoryBank:
    def __init__(self, size: int, dim: int, labels: torch.Tensor, momentum: float = 0.5,
                 device: torch.device | str | None = None):
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (size,):
            raise ValueError(f"memory bank: labels has shape {tuple(labels.shape)}, expected ({size},) "
                             "(one label per training image)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory bank: momentum must be in [0, 1), got {momentum}")
        if size <= 0 or dim <= 0:
            raise ValueError(f"memory bank: size and dim must be positive, got {size} x {dim}")
        device = torch.device(device) if device is not None else labels.device
        self.momentum = float(momentum)
        self.embeddings = torch.zeros(size, dim, device=device)
        self.labels = labels.to(device)
        self.written = torch.zeros(size, dtype=torch.bool)
        self.last_sampled_indices = torch.zeros(0, dtype=torch.long)

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @torch.no_grad()
    def update(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Momentum-update the slots of `indices`; repeated indices (two views) are averaged."""
        slots, inverse, counts = self.grouping(indices)
        self.write(slots, inverse, counts, embeddings)
        self.written[slots] = True

    @staticmethod
    def grouping(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots, row -> slot position, rows per slot) of an update, found on the host (torch.unique
        on the GPU would wait for the device)."""
        unique, inverse = torch.unique(indices.cpu(), return_inverse=True)
        return unique, inverse, torch.bincount(inverse, minlength=unique.shape[0])

    @torch.no_grad()
    def write(self, slots: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor,
              embeddings: torch.Tensor) -> None:
        """The update's arithmetic, given its `grouping` (on any device: with the grouping already
        on the bank's device this is device work alone, so a CUDA graph can replay it)."""
        device = self.embeddings.device
        emb = embeddings.detach().to(device=device, dtype=self.embeddings.dtype)
        slots_dev, inverse = to_device(slots, device), to_device(inverse, device)
        sums = torch.zeros(slots.shape[0], emb.shape[1], device=device, dtype=emb.dtype)
        sums.index_add_(0, inverse, emb)
        mean = sums / to_device(counts, device).to(emb.dtype)[:, None]
        m = self.momentum
        self.embeddings[slots_dev] = F.normalize(m * self.embeddings[slots_dev] + (1 - m) * mean, dim=1)

    def sample(self, k: int, exclude: torch.Tensor | None = None,
               generator: torch.Generator | None = None,
               written_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw min(k, eligible) slots outside `exclude`; returns (embeddings, labels).

        Eligible are the slots written at least once (SPEC 5), or with `written_only=False` every
        slot (the published README's reading: unwritten slots are zero vectors)."""
        return self.gather(self.draw(k, exclude, generator, written_only))

    def draw(self, k: int, exclude: torch.Tensor | None = None, generator: torch.Generator | None = None,
             written_only: bool = True) -> torch.Tensor:
        """The slots `sample` reads (on the host, from the CPU generator)."""
        eligible = self.written.clone() if written_only else torch.ones_like(self.written)
        if exclude is not None:
            eligible[exclude.cpu()] = False
        candidates = eligible.nonzero().squeeze(1)
        order = torch.randperm(candidates.shape[0], generator=generator)[:k]
        chosen = candidates[order]
        self.last_sampled_indices = chosen
        return chosen

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, labels) of `slots` (device work alone when `slots` is on the bank's device)."""
        slots = to_device(slots, self.embeddings.device)
        return self.embeddings[slots], self.labels[slots]

    def stage_step(self, k: int, batch_indices: torch.Tensor, views: int, generator: torch.Generator,
                   written_only: bool = True) -> "BankStep":
        """One training step's host work, done before the step (a replayed CUDA graph cannot do
        it): the slots it draws and the grouping of its update, on the bank's device, with the batch
        marked written. The same draws, in the same generator order, as `sample` then `update`."""
        chosen = self.draw(k, batch_indices, generator, written_only)
        slots, inverse, counts = self.grouping(torch.cat([batch_indices] * views))
        self.written[slots] = True
        device = self.embeddings.device
        return BankStep(*(to_device(t, device) for t in (chosen, slots, inverse, counts)))

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings.detach().cpu().clone(),
                "labels": self.labels.cpu().clone(),
                "written": self.written.clone(),
                "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["embeddings"].shape) != tuple(self.embeddings.shape):
            raise ValueError(f"memory bank state has shape {tuple(state['embeddings'].shape)}, "
                             f"this bank is {tuple(self.embeddings.shape)}")
        self.embeddings.copy_(state["embeddings"])
        self.labels.copy_(state["labels"])
        self.written.copy_(state["written"])
        self.momentum = float(state["momentum"])
