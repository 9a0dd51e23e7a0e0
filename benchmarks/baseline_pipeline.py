"""The straightforward pipeline that bench_data.py, bench_step.py and bench_flops.py measure
desupcon against.

This is how the published code trained a student, made explicit and kept honest (same models,
same losses from `desupcon.losses`, same optimiser groups, same batch size):

- data: torchvision PIL transforms applied to one image at a time inside a `DataLoader`
  (`RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `ColorJitter(0.2, 0.2, 0.2)`,
  `ToTensor()`, `Normalize`), a dataset wrapper returning two independently augmented views;
- step: one teacher forward for the features, a *second* teacher forward for the logits, a student
  forward over both views for the projection, a *separate* student forward over view 1 for the
  online classifier (on detached features), the losses, Adam, and a per-step `loss.item()`.

It runs in plain float32 and the default memory format on every device (no autocast, no
channels_last, no fused optimiser): that is the baseline, not a tuned variant.
Nothing in `desupcon/` imports this module.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from desupcon import losses
from desupcon.config import RunConfig
from desupcon.memory_bank import MomentumMemoryBank
from desupcon.models import Student, Teacher


def baseline_transform(mean: torch.Tensor, std: torch.Tensor, image_size: int = 32,
                       padding: int = 4) -> transforms.Compose:
    """The per-image torchvision augmentation of the straightforward pipeline."""
    return transforms.Compose([
        transforms.RandomCrop(image_size, padding=padding),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.2, 0.2, 0.2),
        transforms.ToTensor(),
        transforms.Normalize(mean.tolist(), std.tolist()),
    ])


class TwoViewPILDataset(Dataset):
    """Images kept as HWC uint8 numpy (like torchvision's CIFAR datasets), converted to a PIL image
    per item and augmented twice. Items: (view1, view2, label, index)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = np.ascontiguousarray(images.cpu().permute(0, 2, 3, 1).numpy())
        self.labels = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return self.transform(img), self.transform(img), self.labels[i], i


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """Shuffled, drop_last DataLoader; workers persist across epochs (the kinder setting)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


class BaselineStep:
    """One student trained the straightforward way. Same parameter groups as
    `desupcon.engine.loop.make_student_run`: encoder + projector and classifier at lr, the student's own
    copy of the teacher projection head at lr / 10, weight decay on all."""

    def __init__(self, cfg: RunConfig, teacher: Teacher | None, student: Student, num_train: int,
                 train_labels: torch.Tensor, device: torch.device):
        self.cfg, self.m = cfg, cfg.method
        self.teacher, self.student, self.device = teacher, student.to(device), device
        self.uses_teacher = self.m.method in ("crd", "lw-supcrd", "hybrid")
        lr, wd = cfg.optim.lr, cfg.optim.weight_decay
        groups = [{"params": list(student.parameters()), "lr": lr, "weight_decay": wd}]
        self.head = None
        if self.uses_teacher:
            self.head = copy.deepcopy(teacher.head).to(device).train()
            groups.append({"params": list(self.head.parameters()), "lr": lr / 10, "weight_decay": wd})
        self.optimizer = torch.optim.Adam(groups)
        self.bank = None
        if self.uses_teacher and self.m.bank_size > 0:
            self.bank = MomentumMemoryBank(num_train, self.head[-1].out_features, train_labels,
                                           self.m.bank_momentum, device=device)
            self.bank_generator = torch.Generator().manual_seed(cfg.optim.seed + 1)
        self.student.train()

    def _representation_loss(self, s_proj, t_proj, t_logits, labels, bank, bank_labels):
        m = self.m
        if m.method == "supcon":
            return losses.supcon_loss(s_proj, labels, m.temperature)
        if m.method == "crd":
            return losses.crd_loss(s_proj, t_proj, m.temperature, bank=bank)
        kwargs = dict(alpha=m.alpha, beta=m.beta, temperature=m.temperature,
                      adaptive_beta=m.adaptive_beta, kd_temperature=m.kd_temperature,
                      bank=bank, bank_labels=bank_labels)
        if m.method == "hybrid":
            return losses.hybrid_loss(s_proj, t_proj, t_logits, labels, lam=m.lam, **kwargs)
        return losses.lw_supcrd_loss(s_proj, t_proj, t_logits, labels, **kwargs)

    def step(self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor,
             indices: torch.Tensor) -> float:
        view1, view2, labels = (t.to(self.device, non_blocking=True) for t in (view1, view2, labels))
        student = self.student
        if self.m.method == "ce":  # one view, classifier trained with the encoder
            loss = F.cross_entropy(student.classifier(student.encoder.forward_features(view1)), labels)
        else:
            views = torch.cat([view1, view2])
            labels2 = torch.cat([labels, labels])
            t_proj = t_logits = None
            if self.uses_teacher:
                encoder = self.teacher.encoder
                with torch.no_grad():
                    t_features = encoder.forward_features(views)  # teacher forward 1: features
                    t_logits = encoder(views)  # teacher forward 2: logits
                t_proj = F.normalize(self.head(t_features), dim=1)
            # student forward 1: projection over both views
            s_proj = F.normalize(student.projector(student.encoder.forward_features(views)), dim=1)
            # student forward 2: the online classifier on detached view-1 features
            with torch.no_grad():
                f1 = student.encoder.forward_features(view1)
            logits = student.classifier(f1)
            bank = bank_labels = None
            if self.bank is not None:
                bank, bank_labels = self.bank.sample(self.m.bank_size, exclude=indices,
                                                     generator=self.bank_generator)
            loss = (self._representation_loss(s_proj, t_proj, t_logits, labels2, bank, bank_labels)
                    + F.cross_entropy(logits, labels))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.bank is not None:
            self.bank.update(torch.cat([indices, indices]), t_proj.detach())
        return loss.item()  # the straightforward loop logs the loss every step
