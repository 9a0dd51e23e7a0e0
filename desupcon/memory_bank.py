"""Momentum memory bank of teacher embeddings (SPEC section 5).

One unit-vector slot per training image plus its label. After each step every image of the batch
updates its slot with the mean of its views' detached teacher embeddings:

    slot <- normalise(m * slot + (1 - m) * mean_views(t))

Slots start at zero, so the first write stores normalise(mean_views(t)). Each step draws K slots
uniformly without replacement from the slots written at least once, excluding the current batch
(or, in the published README's reading, from all slots).

The bookkeeping (which slots are written, which are drawn) lives on the CPU with a CPU generator, so
sampling never waits for the GPU and is identical on every device; the embeddings stay on the
training device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from desupcon.engine.devices import to_device


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
        device = self.embeddings.device
        # Group repeated indices on the CPU: torch.unique on the GPU would wait for the device.
        unique, inverse = torch.unique(indices.cpu(), return_inverse=True)
        counts = torch.bincount(inverse, minlength=unique.shape[0]).to(self.embeddings.dtype)
        unique_dev = to_device(unique, device)
        emb = embeddings.detach().to(device=device, dtype=self.embeddings.dtype)
        sums = torch.zeros(unique.shape[0], emb.shape[1], device=device, dtype=emb.dtype)
        sums.index_add_(0, to_device(inverse, device), emb)
        counts = to_device(counts, device)
        mean = sums / counts[:, None]
        m = self.momentum
        self.embeddings[unique_dev] = F.normalize(m * self.embeddings[unique_dev] + (1 - m) * mean, dim=1)
        self.written[unique] = True

    def sample(self, k: int, exclude: torch.Tensor | None = None,
               generator: torch.Generator | None = None,
               written_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw min(k, eligible) slots outside `exclude`; returns (embeddings, labels).

        Eligible are the slots written at least once (SPEC 5), or with `written_only=False` every
        slot (the published README's reading: unwritten slots are zero vectors)."""
        eligible = self.written.clone() if written_only else torch.ones_like(self.written)
        if exclude is not None:
            eligible[exclude.cpu()] = False
        candidates = eligible.nonzero().squeeze(1)
        order = torch.randperm(candidates.shape[0], generator=generator)[:k]
        chosen = candidates[order]
        self.last_sampled_indices = chosen
        chosen_dev = to_device(chosen, self.embeddings.device)
        return self.embeddings[chosen_dev], self.labels[chosen_dev]

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
