"""The two momentum banks of CRD as published by Tian et al. (SPEC section 14, `crd-nce`).

One slot per training image in each of two N x D banks: the student bank holds student embeddings,
the teacher bank teacher embeddings. Slots start uniform in [-stdv, stdv], stdv = 1 / sqrt(D / 3)
(so a slot's expected squared norm is 1), and after each step every image of the batch updates its
slot in both banks with its detached embedding:

    slot <- normalise(m * slot + (1 - m) * v),   m = 0.5

For each anchor the contrast rows are its own slot (the positive, row 0) followed by K slots of images
of other classes (negatives, drawn uniformly without replacement within a row). The student embedding is scored
against the teacher bank's rows and the teacher embedding against the student bank's rows; the two
normalising constants Z_s, Z_t are fixed once, at the first batch, as mean(exp(v . m / tau)) * N over
that batch's (B, K + 1) scores (see `losses.crd_nce_loss` for every formula).

Sampling runs on the CPU with a CPU generator (reproducible and identical on every device); the banks
stay on the training device.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.engine.devices import to_device
from desupcon.losses import crd_nce_logits, crd_nce_loss, crd_nce_normaliser


class CRDMemory(nn.Module):
    """The two banks (buffers: they move and save with the module that owns the memory) and the
    negative sampling; the normalising constants and labels are its extra state."""

    def __init__(self, labels: torch.Tensor, dim: int = 128, momentum: float = 0.5,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None):
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if labels.dim() != 1 or labels.shape[0] == 0:
            raise ValueError(f"crd memory: labels must be a non-empty 1-d tensor (one label per "
                             f"training image), got shape {tuple(labels.shape)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"crd memory: momentum must be in [0, 1), got {momentum}")
        if dim <= 0:
            raise ValueError(f"crd memory: dim must be positive, got {dim}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        size = labels.shape[0]
        stdv = 1.0 / math.sqrt(dim / 3)
        super().__init__()
        self.momentum = float(momentum)
        for bank in ("student_bank", "teacher_bank"):  # (student first: the draws' order is the original's)
            self.register_buffer(bank, (torch.rand(size, dim, generator=generator) * (2 * stdv) - stdv).to(device))
        self.z_student: float | None = None
        self.z_teacher: float | None = None
        self.last_negatives = torch.zeros(0, 0, dtype=torch.long)
        self._set_labels(labels)

    def _set_labels(self, labels: torch.Tensor) -> None:
        """Labels plus the class-sorted image list that negative sampling draws from."""
        self.labels = labels.cpu().clone()
        self._by_class = torch.argsort(self.labels, stable=True)
        num_classes = int(self.labels.max()) + 1
        self._class_count = torch.bincount(self.labels, minlength=num_classes)
        self._class_start = torch.cumsum(self._class_count, 0) - self._class_count

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    def sample_negatives(self, indices: torch.Tensor, labels: torch.Tensor | None, k: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, k) CPU long indices of images whose class differs from each anchor's.

        Uniform over the images of the other classes, without replacement within a row (SPEC 14,
        as both original implementations draw them); a row whose anchor has fewer than k images of
        other classes is drawn with replacement instead (the originals' fallback). Positions r in
        [0, N - n_y) are mapped into the class-sorted image list, jumping over the anchor's own
        class block [start_y, start_y + n_y). `labels` are the anchors' classes (None: the stored
        labels of `indices`).
        """
        y = self.labels[indices.cpu()] if labels is None else labels.cpu().long()
        n_other = self.size - self._class_count[y]  # (B,)
        if bool((n_other == 0).any()):
            raise ValueError("crd memory: an anchor's class holds every image, no negatives to draw")
        # without replacement: the k smallest of uniform keys over each row's n_other positions
        keys = torch.rand(y.shape[0], int(n_other.max()), generator=generator)
        keys.masked_fill_(torch.arange(keys.shape[1]) >= n_other[:, None], 2.0)
        short = n_other < k
        if bool(short.all()):
            r = torch.empty(y.shape[0], 0, dtype=torch.long)
        else:
            r = keys.topk(min(k, keys.shape[1]), dim=1, largest=False).indices[:, :k]
        if bool(short.any()):  # fewer candidates than k: uniform with replacement for those rows
            u = torch.rand(y.shape[0], k, generator=generator, dtype=torch.float64)
            drawn = (u * n_other[:, None]).long().minimum(n_other[:, None] - 1)
            r = drawn if r.shape[1] < k else torch.where(short[:, None], drawn, r)
        start = self._class_start[y][:, None]
        r = r + (r >= start).long() * self._class_count[y][:, None]
        return self._by_class[r]

    def contrast_rows(self, indices: torch.Tensor,
                      negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student_rows, teacher_rows), each (B, K + 1, D): own slot first, then the negatives."""
        rows = torch.cat([indices.cpu().long()[:, None], negatives.cpu().long()], dim=1)
        rows = to_device(rows, self.student_bank.device)
        return self.student_bank[rows], self.teacher_bank[rows]

    def loss(self, student_embed: torch.Tensor, teacher_embed: torch.Tensor, indices: torch.Tensor,
             labels: torch.Tensor | None, k: int, generator: torch.Generator | None = None,
             temperature: float = 0.07) -> torch.Tensor:
        """The CRD loss of one step (both directions summed); call `update` after it.

        Draws the negatives, gathers the contrast rows and, at the first call only, fixes
        Z_s = mean(exp(v_s . m_t / tau)) * N and Z_t = mean(exp(v_t . m_s / tau)) * N from this
        batch's scores.
        """
        negatives = self.sample_negatives(indices, labels, k, generator)
        self.last_negatives = negatives
        student_rows, teacher_rows = self.contrast_rows(indices, negatives)
        if self.z_student is None or self.z_teacher is None:
            with torch.no_grad():
                self.z_student = crd_nce_normaliser(
                    crd_nce_logits(student_embed, teacher_rows, temperature), self.size)
                self.z_teacher = crd_nce_normaliser(
                    crd_nce_logits(teacher_embed, student_rows, temperature), self.size)
        return crd_nce_loss(student_embed, teacher_embed, student_rows, teacher_rows, self.size,
                            self.z_student, self.z_teacher, temperature)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, student_embed: torch.Tensor,
               teacher_embed: torch.Tensor) -> None:
        """slot <- normalise(m * slot + (1 - m) * normalise(v)) in both banks.

        Repeated indices (several views of one image) use the mean of their embeddings.
        """
        device = self.student_bank.device
        unique, inverse = torch.unique(indices.cpu(), return_inverse=True)
        counts = torch.bincount(inverse, minlength=unique.shape[0]).to(self.student_bank.dtype)
        unique_dev, inverse_dev = to_device(unique, device), to_device(inverse, device)
        counts = to_device(counts, device)
        m = self.momentum
        for bank, embed in ((self.student_bank, student_embed), (self.teacher_bank, teacher_embed)):
            v = F.normalize(embed.detach().to(device=device, dtype=bank.dtype), dim=1)
            sums = torch.zeros(unique.shape[0], v.shape[1], device=device, dtype=v.dtype)
            sums.index_add_(0, inverse_dev, v)
            mean = sums / counts[:, None]
            bank[unique_dev] = F.normalize(m * bank[unique_dev] + (1 - m) * mean, dim=1)

    def get_extra_state(self) -> dict:
        return {"labels": self.labels.clone(), "z_student": self.z_student, "z_teacher": self.z_teacher,
                "momentum": self.momentum}

    def set_extra_state(self, state: dict) -> None:
        self._set_labels(torch.as_tensor(state["labels"], dtype=torch.long))
        self.z_student = None if state["z_student"] is None else float(state["z_student"])
        self.z_teacher = None if state["z_teacher"] is None else float(state["z_teacher"])
        self.momentum = float(state["momentum"])
