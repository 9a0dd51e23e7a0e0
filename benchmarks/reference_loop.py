"""The documented student protocol written out plainly, top to bottom: an oracle for the engine.

It shares with desupcon only the model constructors (`build_encoder`, `Student`, `mlp`) and the loss
functions of `desupcon.losses`; the data, augmentation, batching, optimiser groups, teacher head
copy, online classifier, memory bank, schedule and evaluation are its own, written as a reader of
the documentation would write them. `tests/test_reference_loop.py` feeds it and the engine the same
weights and batches and asks for the same losses and weights (and the teacher's training, its
probe and the augmentation, given the same draws). Run as a script, it trains a teacher (or takes
the engine's, `--teacher-checkpoint`), probes its projection head and trains the students of each
seed on an npz folder, for a table beside the engine's (docs/results.md).

    python benchmarks/reference_loop.py --data ../shared/data/cifar100 --train-images 10000 \
        --teacher-arch resnet20 --student-arch resnet8 --epochs 15 --teacher-epochs 15 \
        --probe-epochs 3 --seeds 0 1 2 --out runs/reference/seeds.json

The protocol (`paper-bank` without a bank, as measured; every number a flag):
- data: a stratified training subset (an equal share of every class), the full test set, images
  normalised with the full training split's channel mean and std;
- augmentation, per image and view: 4-pixel zero padding and a random 32x32 crop, a horizontal flip
  with probability 1/2, then brightness, contrast and saturation factors uniform in [1 - j, 1 + j]
  applied in that order (j = 0.2);
- teacher: cross-entropy, Adam (1e-3, weight decay 1e-4, cosine over its epochs), batch 128 of one
  view, last partial batch dropped; then frozen (BatchNorm statistics fixed), and its projection
  head (features -> 512 -> 128 -> 64) trained as a cosine probe: a bias-free classifier of unit
  rows, logits = cos / 0.07, Adam 1e-3 constant, the probe classifier discarded afterwards;
- students: two views per image in every batch of 128 images; the student sees both views
  (cross-entropy students: view 1), the teacher sees both (its logits and features detached); a
  trainable copy of the probed head maps the teacher's features to its embeddings; one Adam over
  three groups: encoder and projector (lr 1e-3, weight decay 1e-4, cosine over the epochs),
  the online linear classifier on detached view-1 features (1e-3, constant, no decay) and the head
  copy (1e-4, constant, no decay); a cross-entropy student trains its classifier with the encoder;
- the reported accuracy: the classifier's on the test set after the last epoch.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon import losses
from desupcon.models import Student, build_encoder, mlp

TWO_VIEW = ("supcon", "crd", "lw-supcrd", "hybrid")
READS_TEACHER = ("crd", "lw-supcrd", "hybrid")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def load_npz_folder(folder: str) -> dict:
    """train/test uint8 images (N, 3, H, W) and int64 labels from `train.npz` / `test.npz`."""
    out = {}
    for split in ("train", "test"):
        with np.load(Path(folder) / f"{split}.npz", allow_pickle=False) as f:
            out[f"{split}_images"] = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).contiguous()
            out[f"{split}_labels"] = torch.from_numpy(f["labels"].astype(np.int64))
    pixels = out["train_images"].double() / 255
    out["mean"], out["std"] = pixels.mean(dim=(0, 2, 3)).float(), pixels.std(dim=(0, 2, 3)).float()
    return out


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n // classes images of every class, a seeded choice within each class."""
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = n // len(classes)
    picked = [torch.nonzero(labels == c).flatten() for c in classes]
    return torch.cat([p[torch.randperm(len(p), generator=g)[:per_class]] for p in picked]).sort().values


def augment_one(image: torch.Tensor, top: int, left: int, flip: bool, factors: tuple[float, float, float],
                padding: int = 4) -> torch.Tensor:
    """One view of one float image (3, H, W) in [0, 1]: the crop at (top, left) of the zero-padded
    image, the flip, then brightness, contrast (towards the grey mean) and saturation (towards the
    grey image), each clamped to [0, 1]; grey = 0.299 R + 0.587 G + 0.114 B."""
    _, h, w = image.shape
    x = F.pad(image, (padding,) * 4)[:, top:top + h, left:left + w]
    if flip:
        x = x.flip(-1)
    brightness, contrast, saturation = factors
    x = (x * brightness).clamp(0, 1)
    grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    x = (contrast * x + (1 - contrast) * grey.mean()).clamp(0, 1)
    grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    return (saturation * x + (1 - saturation) * grey).clamp(0, 1)


def augment(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, g: torch.Generator,
            jitter: float = 0.2, padding: int = 4) -> torch.Tensor:
    """One augmented, normalised view of uint8 images (B, 3, H, W), each image's draws its own."""
    out = torch.empty(images.shape, dtype=torch.float32)
    for i in range(images.shape[0]):  # written per image for clarity: the oracle is read, not timed
        top, left = torch.randint(0, 2 * padding + 1, (2,), generator=g).tolist()
        flip = torch.rand(1, generator=g).item() < 0.5
        factors = tuple((1 + jitter * (2 * torch.rand(3, generator=g) - 1)).tolist())
        out[i] = augment_one(images[i].float() / 255, top, left, flip, factors, padding)
    return (out - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def epoch_of_batches(data: dict, batch_size: int, views: int, g: torch.Generator, drop_last: bool):
    """(indices, view1, view2 or None, labels) per batch of one shuffled epoch."""
    n = data["train_labels"].shape[0]
    order = torch.randperm(n, generator=g)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        images = data["train_images"][idx]
        view1 = augment(images, data["mean"], data["std"], g)
        view2 = augment(images, data["mean"], data["std"], g) if views == 2 else None
        yield idx, view1, view2, data["train_labels"][idx]


@torch.no_grad()
def test_accuracy(logits_of, data: dict) -> float:
    correct = 0
    for start in range(0, data["test_labels"].shape[0], 500):
        x = (data["test_images"][start:start + 500].float() / 255 - data["mean"].view(1, 3, 1, 1)) \
            / data["std"].view(1, 3, 1, 1)
        correct += (logits_of(x).argmax(1) == data["test_labels"][start:start + 500]).sum().item()
    return 100.0 * correct / data["test_labels"].shape[0]


def cosine(epoch: int, epochs: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * epoch / epochs))


# ----------------------------------------------------------------------------------------------
# Teacher: cross-entropy training, then the cosine probe of its projection head
# ----------------------------------------------------------------------------------------------

def train_teacher(data: dict, arch: str, epochs: int, seed: int, classes: int, batches=None) -> nn.Module:
    """Cross-entropy training; `batches(epoch)` gives an epoch's batches (default: drawn here)."""
    torch.manual_seed(seed)
    encoder = build_encoder(arch, classes)
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    batches = batches or (lambda epoch: epoch_of_batches(data, 128, 1, g, drop_last=True))
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * cosine(epoch, epochs)
        encoder.train()
        for _, x, _, y in batches(epoch):
            loss = F.cross_entropy(encoder.fc(encoder.forward_features(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        encoder.eval()
        if "test_images" in data:
            accuracy = test_accuracy(lambda x: encoder.fc(encoder.forward_features(x)), data)
            print(f"teacher epoch {epoch + 1}/{epochs}: test {accuracy:.2f}%", flush=True)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


def probe_head(teacher: nn.Module, head: nn.Module, data: dict, epochs: int, seed: int, classes: int,
               batches=None) -> nn.Module:
    """The cosine probe: trains `head` (in place) under a bias-free classifier of unit rows."""
    torch.manual_seed(seed)
    weight = nn.Parameter(torch.randn(classes, head[-1].out_features) * 0.01)
    opt = torch.optim.Adam([*head.parameters(), weight], lr=1e-3)
    g = torch.Generator().manual_seed(seed + 7)
    batches = batches or (lambda epoch: epoch_of_batches(data, 128, 1, g, drop_last=True))
    for epoch in range(epochs):
        for _, x, _, y in batches(epoch):
            with torch.no_grad():
                features = teacher.forward_features(x)
            z = F.normalize(head(features), dim=1)
            loss = F.cross_entropy(z @ F.normalize(weight, dim=1).T / 0.07, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"probe epoch {epoch + 1}/{epochs}: last batch's loss {loss.item():.3f}", flush=True)
    return head


# ----------------------------------------------------------------------------------------------
# A student
# ----------------------------------------------------------------------------------------------

class Bank:
    """One slot per training image of teacher embeddings: slot <- normalise(m slot + (1 - m) mean
    of the image's views); each step draws K written slots outside the batch, uniformly."""

    def __init__(self, labels: torch.Tensor, dim: int, size: int, momentum: float, seed: int,
                 positives: bool = True):
        self.labels, self.size, self.momentum, self.positives = labels, size, momentum, positives
        self.slots = torch.zeros(labels.shape[0], dim)
        self.written = torch.zeros(labels.shape[0], dtype=torch.bool)
        self.g = torch.Generator().manual_seed(seed + 1)

    def draw(self, batch: torch.Tensor) -> torch.Tensor:
        eligible = self.written.clone() if self.positives else torch.ones_like(self.written)
        eligible[batch] = False
        candidates = eligible.nonzero().flatten()
        return candidates[torch.randperm(len(candidates), generator=self.g)[:self.size]]

    @torch.no_grad()
    def write(self, batch: torch.Tensor, t_views: torch.Tensor) -> None:
        b = batch.shape[0]
        mean = (t_views[:b] + t_views[b:]) / 2
        self.slots[batch] = F.normalize(self.momentum * self.slots[batch] + (1 - self.momentum) * mean, dim=1)
        self.written[batch] = True


class ReferenceStudent:
    """One student of the documented protocol: its model, head copy, bank and optimiser."""

    def __init__(self, method: str, arch: str, classes: int, seed: int, teacher: nn.Module | None,
                 head: nn.Module | None, epochs: int, lr: float = 1e-3, weight_decay: float = 1e-4,
                 schedule: str = "cosine", classifier_lr: float = 1e-3, head_lr: float = 1e-4,
                 temperature: float = 0.07, alpha: float = 1.0, beta: float = 10.0, lam: float = 0.5,
                 bank: int = 0, bank_labels: torch.Tensor | None = None):
        self.method, self.epochs, self.schedule = method, epochs, schedule
        self.temperature, self.alpha, self.beta, self.lam = temperature, alpha, beta, lam
        torch.manual_seed(seed)
        self.model = Student(build_encoder(arch, classes))
        self.teacher = teacher
        self.head = copy.deepcopy(head) if method in READS_TEACHER else None
        classifier = list(self.model.encoder.fc.parameters())
        body = [p for p in self.model.parameters() if all(p is not c for c in classifier)]
        self.base_lrs = [lr]
        groups = [{"params": body, "lr": lr, "weight_decay": weight_decay}]
        if method == "ce":
            groups.append({"params": classifier, "lr": lr, "weight_decay": weight_decay})
            self.base_lrs.append(lr)
        else:
            groups.append({"params": classifier, "lr": classifier_lr, "weight_decay": 0.0})
            self.base_lrs.append(None)  # constant
        if self.head is not None:
            groups.append({"params": list(self.head.parameters()), "lr": head_lr, "weight_decay": 0.0})
            self.base_lrs.append(None)
        self.opt = torch.optim.Adam(groups)
        self.bank = Bank(bank_labels, 64, bank, 0.5, seed) if bank else None
        self.scales, self.scale_steps = None, 0  # the hybrid's running scales
        self.epoch = 0

    def set_epoch_lr(self) -> None:
        """The learning rates of the coming epoch (schedules step per epoch)."""
        factor = cosine(self.epoch, self.epochs) if self.schedule == "cosine" else 1.0
        for group, base in zip(self.opt.param_groups, self.base_lrs):
            if base is not None:
                group["lr"] = base * factor

    def losses(self, idx, view1, view2, y) -> dict[str, torch.Tensor]:
        """The step's named losses (the optimiser is not touched)."""
        b = y.shape[0]
        if self.method == "ce":
            logits = self.model(view1).logits
            return {"ce": F.cross_entropy(logits, y)}
        x = torch.cat([view1, view2])
        labels = torch.cat([y, y])
        features = self.model.encoder.forward_features(x)
        s = F.normalize(self.model.projector(features), dim=1)
        out = {}
        if self.method in READS_TEACHER:
            with torch.no_grad():
                t_features = self.teacher.forward_features(x)
                t_logits = self.teacher.fc(t_features)
            t = F.normalize(self.head(t_features), dim=1)
            self.last_t = t.detach()
            kwargs = dict(alpha=self.alpha, beta=self.beta, temperature=self.temperature)
            bank = bank_labels = None
            if self.bank is not None:
                chosen = self.bank.draw(idx)
                bank, bank_labels = self.bank.slots[chosen], self.bank.labels[chosen]
            if self.method == "crd":
                out["crd"] = losses.crd_loss(s, t, self.temperature, bank=bank)
            elif self.method == "lw-supcrd":
                out["lw_supcrd"] = losses.lw_supcrd_loss(s, t, t_logits, labels, bank=bank,
                                                         bank_labels=bank_labels, **kwargs)
            else:  # hybrid: each term over a running scale of itself, moving for 100 steps
                supcon = losses.supcon_loss(s, labels, self.temperature)
                lw = losses.lw_supcrd_loss(s, t, t_logits, labels, bank=bank, bank_labels=bank_labels, **kwargs)
                now = torch.stack([supcon.detach(), lw.detach()])
                if self.scale_steps < 100:
                    self.scales = now if self.scales is None else 0.9 * self.scales + 0.1 * now
                    self.scale_steps += 1
                out["hybrid"] = self.lam * supcon / self.scales[0] + (1 - self.lam) * lw / self.scales[1]
        else:
            out["supcon"] = losses.supcon_loss(s, labels, self.temperature)
        out["online_classifier"] = F.cross_entropy(self.model.encoder.fc(features[:b].detach()), y)
        return out

    def step(self, idx, view1, view2, y) -> dict[str, float]:
        for m in (self.model, self.head):
            if m is not None:
                m.train()
        parts = self.losses(idx, view1, view2, y)
        self.opt.zero_grad()
        sum(parts.values()).backward()
        self.opt.step()
        if self.bank is not None:
            self.bank.write(idx, self.last_t)
        return {k: v.item() for k, v in parts.items()}

    def test_accuracy(self, data: dict) -> float:
        self.model.eval()
        return test_accuracy(lambda x: self.model(x).logits, data)


def train_students(data: dict, args, seed: int, teacher: nn.Module, head: nn.Module, classes: int) -> dict:
    """Every method's student of one seed over the same batches; its per-epoch test accuracies."""
    students = {m: ReferenceStudent(m, args.student_arch, classes, seed, teacher, head, args.epochs)
                for m in args.methods}
    g = torch.Generator().manual_seed(seed)
    log = {m: [] for m in students}
    for epoch in range(args.epochs):
        for student in students.values():
            student.set_epoch_lr()
        for idx, v1, v2, y in epoch_of_batches(data, 128, 2, g, drop_last=True):  # the same batches for all
            for student in students.values():
                student.step(idx, v1, v2, y)
        for m, student in students.items():
            student.epoch += 1
            log[m].append(student.test_accuracy(data))
        print(f"seed {seed} epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{m} {log[m][-1]:.2f}" for m in log),
              flush=True)
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="an npz folder (train.npz, test.npz)")
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--teacher-arch", default="resnet20")
    ap.add_argument("--student-arch", default="resnet8")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--probe-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="the students' seeds, one after the other, with one teacher (its seed: --teacher-seed)")
    ap.add_argument("--teacher-seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["ce", "supcon", "crd", "lw-supcrd"],
                    choices=["ce", *TWO_VIEW])
    ap.add_argument("--teacher-checkpoint", default=None,
                    help="the engine's teacher-with-projection file (pth_models/teacher_..._with_projection.pth): "
                         "its backbone and probed head instead of training and probing one here, so that both "
                         "loops' students learn from one teacher (read with torch.load(weights_only=True))")
    ap.add_argument("--out", required=True, help="a JSON file for the results, rewritten after each seed")
    args = ap.parse_args()
    started = time.time()
    data = load_npz_folder(args.data)
    keep = stratified_subset(data["train_labels"], args.train_images, seed=0)
    data["train_images"], data["train_labels"] = data["train_images"][keep], data["train_labels"][keep]
    classes = int(data["train_labels"].max()) + 1
    if args.teacher_checkpoint:
        saved = torch.load(args.teacher_checkpoint, map_location="cpu", weights_only=True)
        teacher = build_encoder(args.teacher_arch, classes)
        teacher.load_state_dict(saved["encoder"])
        head = mlp([teacher.feature_dim, 512, 128, 64])
        head.load_state_dict(saved["head"])
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
    else:
        teacher = train_teacher(data, args.teacher_arch, args.teacher_epochs, args.teacher_seed, classes)
        torch.manual_seed(args.teacher_seed)
        head = probe_head(teacher, mlp([teacher.feature_dim, 512, 128, 64]), data, args.probe_epochs,
                          args.teacher_seed, classes)
    result = {"args": vars(args), "teacher_test_acc": test_accuracy(lambda x: teacher.fc(teacher.forward_features(x)),
                                                                    data), "seeds": {}}
    result["teacher_seconds"] = time.time() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        seed_started = time.time()
        log = train_students(data, args, seed, teacher, head, classes)
        result["seeds"][str(seed)] = {"last_epoch_test_acc": {m: v[-1] for m, v in log.items()},
                                      "best_test_acc": {m: max(v) for m, v in log.items()},
                                      "best_epoch": {m: 1 + v.index(max(v)) for m, v in log.items()},
                                      "per_epoch": log, "seconds": time.time() - seed_started}
        temporary = out.with_suffix(".tmp")
        temporary.write_text(json.dumps(result, indent=1))
        temporary.replace(out)  # a finished seed is never lost to a kill
        print(json.dumps({seed: result["seeds"][str(seed)]["last_epoch_test_acc"]}), flush=True)


if __name__ == "__main__":
    main()
