"""Probes on frozen features (SPEC section 12).

Pure functions (`knn_predict`, `knn_accuracy`, `topk_accuracy`), then the probes of a saved or
in-memory student: the linear probe and the KD probe (a linear head on the frozen, eval-mode
encoder trained through the one training loop, `train.Run` + `train.train_group`: augmented views
per epoch, epoch checkpoints, exact resume), k-NN accuracy on features computed once, and
`probe_checkpoint`, which records a probe's result in the run's checkpoint and results record.

Accuracies are percentages (0-100) as Python floats. Class rankings are stable: among equal scores
the lower class index ranks first, so predictions and top-k hits are deterministic.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon import data as data_mod, losses
from desupcon.config import MethodConfig, OptimConfig, RunConfig
from desupcon.config.validation import ConfigError
from desupcon.engine import distributed as dist
from desupcon.engine.build import build_run
from desupcon.engine.dataset import EVAL_BATCH
from desupcon.engine.devices import as_policy
from desupcon.engine.loop import train_group
from desupcon.methods import Method, Needs, StepOutputs
from desupcon.methods.ce import CrossEntropyMethod
from desupcon.models import ModelOutputs
from desupcon.store.cache import load_student
from desupcon.store.checkpoint import remove_partial
from desupcon.store.paths import OutputPaths
from desupcon.store.records import add_probe_result, save_log
from desupcon.store.weights import fingerprint


__all__ = ["knn_predict", "knn_accuracy", "topk_accuracy", "ProbeConfig", "FrozenEncoderProbe",
           "KDProbeMethod", "fit_probe", "linear_probe", "kd_probe", "knn_probe",
           "probe_checkpoint", "probe_identity", "PROBE_KINDS"]

log = logging.getLogger("desupcon")


def _ranked_classes(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(n, min(k, C)) class indices by decreasing score, ties toward the lower class index."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :min(k, scores.shape[1])]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top<k>": percent of rows whose label is among the k highest scores} for each k in ks.

    Ties rank the lower class index first; k larger than the number of classes counts every row.
    """
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy: no samples")
    ranked = _ranked_classes(logits, max(ks))
    hits = ranked == labels.to(ranked.device).long()[:, None]
    return {f"top{k}": float(hits[:, :k].any(dim=1).float().mean()) * 100.0 for k in ks}


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                test_features: torch.Tensor, k: int = 20, num_classes: int | None = None,
                chunk_size: int = 512, weighting: str = "uniform") -> torch.Tensor:
    """(n_test, C) k-nearest-neighbour class scores on cosine similarity.

    Features are L2-normalised; each test sample's k most similar training samples vote for their
    own class. weighting="uniform" (default): an unweighted majority vote, every neighbour adds 1,
    so the scores are vote counts. weighting="similarity": a neighbour adds its cosine similarity.
    The prediction is the top-scoring class with ties toward the lower class index
    (`topk_accuracy` ranks that way). Neighbours tied in similarity at the k-th place are chosen by
    torch.topk. The test set is processed chunk_size rows at a time (memory chunk_size x n_train);
    num_classes defaults to max(train_labels) + 1. All tensors must be on one device.
    """
    if weighting not in ("uniform", "similarity"):
        raise ValueError(f"knn_predict: weighting must be 'uniform' or 'similarity', got {weighting!r}")
    n_train = train_features.shape[0]
    if not 1 <= k <= n_train:
        raise ValueError(f"knn_predict: k must be in [1, {n_train}] (training samples), got {k}")
    train_labels = train_labels.long()
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    test = F.normalize(test_features.to(dtype), dim=1)
    scores = torch.zeros(test.shape[0], num_classes, dtype=dtype, device=test.device)
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start:start + chunk_size] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.ones_like(top_sim) if weighting == "uniform" else top_sim
        scores[start:start + chunk_size].scatter_add_(1, train_labels[top_idx], votes)
    return scores


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
                 num_classes: int | None = None, chunk_size: int = 512,
                 weighting: str = "uniform") -> dict[str, float]:
    """{"top1": %, "top5": %} of the k-NN vote scores of `knn_predict` against test_labels."""
    scores = knn_predict(train_features, train_labels, test_features, k=k, num_classes=num_classes,
                         chunk_size=chunk_size, weighting=weighting)
    return topk_accuracy(scores, test_labels, ks=(1, 5))


# ----------------------------------------------------------------------------------------------
# Probes trained on a frozen student encoder (SPEC 12), through the one training loop
# ----------------------------------------------------------------------------------------------

PROBE_KINDS = ("linear", "knn", "kd")
PROBE_SCHEDULES = {"linear": "cosine", "kd": "constant"}  # SPEC 12


@dataclass
class ProbeConfig:
    """Settings of a trained probe (linear or KD). `seed` None: the probed run's seed (0 for a
    bare student); `schedule` None: the probe's own (linear: cosine, KD: constant). The KD terms
    are `kd_weight * T^2 KL(teacher || student) + ce_weight * CE` at `temperature`.
    `finetune_last_stage`: the seed's variant, the encoder's last stage trains at `finetune_lr`
    with its BatchNorm in train mode (the rest stays frozen in eval mode)."""

    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    seed: int | None = None
    schedule: str | None = None
    temperature: float = 4.0
    kd_weight: float = 0.7
    ce_weight: float = 0.3
    finetune_last_stage: bool = False
    finetune_lr: float = 1e-5

    def resolved(self, kind: str, seed: int = 0) -> "ProbeConfig":
        """This configuration with `seed` and `schedule` filled in for a probe of `kind`."""
        return dataclasses.replace(self, seed=seed if self.seed is None else self.seed,
                                   schedule=self.schedule or PROBE_SCHEDULES[kind])

    def check(self) -> None:
        problems = [f"{name} must be {rule}, got {value}" for name, value, ok, rule in (
            ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("temperature", self.temperature, self.temperature > 0, "> 0"),
            ("kd_weight", self.kd_weight, self.kd_weight >= 0, ">= 0"),
            ("ce_weight", self.ce_weight, self.ce_weight >= 0, ">= 0"),
            ("finetune_lr", self.finetune_lr, self.finetune_lr > 0, "> 0"),
            ("schedule", self.schedule, self.schedule in (None, "constant", "cosine"),
             "constant or cosine")) if not ok]
        if problems:
            raise ConfigError("probe: " + "; ".join(problems))


def _encoder_of(student: nn.Module) -> nn.Module:
    """A `Student`'s encoder, or the module itself when it is an encoder (has forward_features)."""
    encoder = getattr(student, "encoder", None)
    return encoder if isinstance(encoder, nn.Module) else student


class FrozenEncoderProbe(nn.Module):
    """A linear head on a frozen encoder: forward(x) -> (features, normalised features, logits).

    The encoder stays in eval mode whatever `.train()` is asked (BatchNorm statistics unchanged)
    and its parameters get no gradient (requires_grad False). `head` is a fresh
    `nn.Linear(feature_dim, num_classes)` unless one is given (the two-stage protocol passes the
    student's own, still initial, classifier). With `finetune_last_stage` the encoder's last stage
    (`last_stage_modules`, as the encoder declares it) trains too, its BatchNorm in train mode while
    the probe trains.
    """

    def __init__(self, encoder: nn.Module, num_classes: int | None = None, head: nn.Linear | None = None,
                 finetune_last_stage: bool = False):
        super().__init__()
        if head is None:
            if num_classes is None:
                raise ValueError("FrozenEncoderProbe needs num_classes or a head")
            head = nn.Linear(encoder.feature_dim, num_classes)
        self.encoder = encoder
        self.head = head  # (on the encoder's device once `fit_probe`, or its caller, prepares the probe)
        self.finetune_last_stage = finetune_last_stage
        # the encoder's declared last stage (not submodules of the probe: the encoder holds them)
        self.__dict__["last_stage"] = encoder.last_stage_modules() if finetune_last_stage else []
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        if finetune_last_stage:
            for p in self.last_stage_parameters():
                p.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)
        self.train(False)

    def last_stage_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.last_stage for p in module.parameters()]

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        if mode and self.finetune_last_stage:
            for module in self.last_stage:
                module.train()
        return self

    def forward(self, x: torch.Tensor, detach_classifier: bool = False):
        if self.finetune_last_stage:  # frozen parameters build no graph: only the last stage's
            features = self.encoder.forward_features(x)
        else:
            with torch.no_grad():
                features = self.encoder.forward_features(x)
        logits = self.head(features.detach() if detach_classifier else features)
        return ModelOutputs(features, logits, F.normalize(features, dim=1))

    def trainable_groups(self, config: ProbeConfig) -> list[dict]:
        """Optimiser groups: the head at `config.lr`, the fine-tuned stage at `finetune_lr`; no
        weight decay."""
        groups = [{"params": list(self.head.parameters()), "lr": config.lr, "weight_decay": 0.0}]
        if self.finetune_last_stage:
            groups.append({"params": self.last_stage_parameters(), "lr": config.finetune_lr,
                           "weight_decay": 0.0})
        return groups


class KDProbeMethod(Method):
    """The KD probe's loss (SPEC 12): kd_weight * T^2 KL(softmax(z_t/T) || softmax(z_s/T)) +
    ce_weight * CE, on the teacher's float32 logits of the same augmented view. One view."""

    needs = Needs(views=1, teacher_head=False, online_classifier=False, gathers_batch=False, every_parameter=False)

    def __init__(self, temperature: float = 4.0, kd_weight: float = 0.7, ce_weight: float = 0.3):
        super().__init__(MethodConfig(method="kd"))
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight

    def representation_losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        return {"kd": self.kd_weight * losses.kd_loss(out.student_logits, out.teacher_logits, self.temperature),
                "ce": self.ce_weight * F.cross_entropy(out.student_logits, out.labels)}


def _probe_method(kind: str, config: ProbeConfig) -> Method:
    if kind == "linear":
        return CrossEntropyMethod(MethodConfig(method="ce"))
    if kind == "kd":
        return KDProbeMethod(config.temperature, config.kd_weight, config.ce_weight)
    raise ValueError(f"unknown trained probe {kind!r}; known: linear, kd")


@torch.no_grad()
def _test_logits(model: nn.Module, dataset: data_mod.ImageDataset, policy) -> torch.Tensor:
    outs = []
    for x, _ in data_mod.eval_batches(dataset.test_images, dataset.test_labels, EVAL_BATCH,
                                      dataset.mean, dataset.std):
        with policy.autocast():
            outs.append(model(policy.inputs(x)).logits.float())
    return torch.cat(outs)


def fit_probe(probe: FrozenEncoderProbe, kind: str, dataset: data_mod.ImageDataset, policy,
              config: ProbeConfig = ProbeConfig(), teacher=None, run_config: RunConfig | None = None,
              paths: OutputPaths | None = None, name: str | None = None, identity: dict | None = None,
              resume: bool = True, run_kind: str = "probe") -> dict:
    """Train `probe` (in place) as a `kind` ("linear" or "kd") probe through the one training loop,
    then evaluate it on the clean test images.

    One augmented view per image per epoch (the augmentation of `run_config`: the probed run's),
    Adam without weight decay, `config.schedule`. With `paths` (and `name`, `identity`) the probe
    writes epoch checkpoints `pth_models/in_progress/<name>.pth` and resumes from one of the same
    identity unless `resume` is False; without, it trains in a temporary folder.
    Returns {"top1", "top5", "train_acc", "epochs", "seconds", "log"} (percentages).
    """
    policy = as_policy(policy)
    probe = policy.prepare(probe)
    config = config.resolved(kind, run_config.optim.seed if run_config is not None else 0)
    config.check()
    method = _probe_method(kind, config)
    if method.needs.teacher and teacher is None:
        raise ValueError("the KD probe needs the teacher")
    base = run_config or RunConfig(device=str(policy.device))
    optim = OptimConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                        schedule=config.schedule, drop_last=False, seed=config.seed)
    rcfg = base.replace(method=MethodConfig(method=method.cfg.method), optim=optim)
    name = name or f"probe_{kind}"
    identity = identity if identity is not None else {"probe": kind, "config": dataclasses.asdict(config)}
    run = build_run(rcfg, name, identity, method, probe, probe.trainable_groups(config), [config.schedule],
                    policy, kind=run_kind, data_views=1)
    with tempfile.TemporaryDirectory(prefix="desupcon_probe_") as scratch:
        out = paths if paths is not None else OutputPaths(scratch)
        finished, failures = train_group([run], dataset, teacher if method.needs.teacher else None, out,
                                         resume=resume and paths is not None, save_every=base.save_every)
        if failures:
            raise failures[0]
        if dist.is_main():
            remove_partial(out, name)
    probe.eval()
    acc = topk_accuracy(_test_logits(probe, dataset, policy), dataset.test_labels, ks=(1, 5))
    entries = finished[0].log
    return {"top1": acc["top1"], "top5": acc["top5"], "train_acc": entries[-1]["train_acc"],
            "epochs": config.epochs, "seconds": sum(e["seconds"] for e in entries), "log": entries}


def _frozen_copy(student: nn.Module, num_classes: int, finetune: bool) -> FrozenEncoderProbe:
    """A probe on a copy of the student's encoder (the student itself is never changed)."""
    encoder = copy.deepcopy(_encoder_of(student))
    return FrozenEncoderProbe(encoder, num_classes, finetune_last_stage=finetune)


def linear_probe(student: nn.Module, dataset: data_mod.ImageDataset, policy,
                 config: ProbeConfig = ProbeConfig(), **kwargs) -> dict:
    """Linear probe (SPEC 12): a fresh linear classifier on the frozen, eval-mode encoder of
    `student` (a `Student` or an encoder), CE on one augmented view per image per epoch, Adam 1e-3,
    cosine, `config.epochs` (50). The student is not changed. `kwargs` go to `fit_probe`
    (run_config, paths, name, identity, resume). Returns `fit_probe`'s dict."""
    torch.manual_seed(config.seed or 0)  # the head's initialisation
    probe = as_policy(policy).prepare(_frozen_copy(student, dataset.num_classes, config.finetune_last_stage))
    return fit_probe(probe, "linear", dataset, policy, config, **kwargs)


def kd_probe(student: nn.Module, teacher, dataset: data_mod.ImageDataset, policy,
             config: ProbeConfig = ProbeConfig(), **kwargs) -> dict:
    """KD probe (SPEC 12, phase 2 of the two-stage protocol): a fresh linear head on the frozen
    encoder trained with 0.7 * T^2 KL(teacher || student) + 0.3 CE, T = 4, Adam 1e-3, no weight
    decay, constant lr, on the teacher's logits of the same augmented view. The student is not
    changed. Returns `fit_probe`'s dict."""
    torch.manual_seed(config.seed or 0)
    probe = as_policy(policy).prepare(_frozen_copy(student, dataset.num_classes, config.finetune_last_stage))
    return fit_probe(probe, "kd", dataset, policy, config, teacher=teacher, **kwargs)


def knn_probe(student: nn.Module, dataset: data_mod.ImageDataset, policy, k: int = 20,
              weighting: str = "uniform") -> dict:
    """k-NN accuracy (SPEC 12): normalised backbone features of the clean train and test images,
    computed once with the encoder frozen in eval mode, and `knn_accuracy` (cosine, k = 20; k is
    capped at the number of training images). Returns {"top1", "top5", "k"}."""
    from desupcon.analysis.evaluate import embed  # late: evaluation loads the plotting stack
    encoder = _encoder_of(student)
    was_training = encoder.training
    encoder.eval()
    try:
        train_f = embed(encoder.forward_features, dataset.train_images, dataset, policy)
        test_f = embed(encoder.forward_features, dataset.test_images, dataset, policy)
    finally:
        encoder.train(was_training)
    k = min(k, train_f.shape[0])
    acc = knn_accuracy(train_f, dataset.train_labels.cpu(), test_f, dataset.test_labels.cpu(), k=k,
                       num_classes=dataset.num_classes, weighting=weighting)
    return {"top1": acc["top1"], "top5": acc["top5"], "k": k}


# -- probing saved students ---------------------------------------------------------------------

def _output_root(path: Path) -> Path:
    """pth_models/<name>.pth or pth_models/imported/<name>.pth -> the output folder."""
    return path.parent.parent.parent if path.parent.name == "imported" else path.parent.parent


def probe_identity(kind: str, student: nn.Module, cfg: RunConfig, config: ProbeConfig | None,
                   teacher=None, k: int | None = None) -> dict:
    """What determines a probe's result: the student's weights (by content), the data, the probe's
    settings and, for the KD probe, the teacher (by content)."""
    out = {"probe": kind, "student": fingerprint(student), "data": cfg.data_identity()}
    if config is not None:
        out["config"] = dataclasses.asdict(config)
    if k is not None:
        out["k"] = k
    if kind == "kd":
        out["teacher"] = getattr(teacher, "fingerprint", None) or fingerprint(teacher)
    return out


def probe_checkpoint(path: str | Path, kind: str, dataset: data_mod.ImageDataset, policy, teacher=None,
                     config: ProbeConfig = ProbeConfig(), k: int = 20, output_root: str | Path | None = None,
                     resume: bool = True) -> dict:
    """Run one probe (`kind`: linear | knn | kd) on a saved student and record it.

    The result goes into the run's record as `record["probes"][kind]`, beside, never instead of,
    the online classifier's `accuracy`, and a trained probe's per-epoch log into
    `json_results/training_logs/<run>__probe_<kind>.json`; the checkpoint is never rewritten. Trained probes write epoch
    checkpoints under the output folder (`pth_models/in_progress/<run>__probe_<kind>.pth`) and
    resume from them. The KD probe needs the run's `teacher`. Returns the result dict.
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe {kind!r}; known: {', '.join(PROBE_KINDS)}")
    if kind == "kd" and teacher is None:
        raise ValueError("the KD probe needs the teacher the run was distilled from")
    path = Path(path)
    policy = as_policy(policy)
    student, ckpt = load_student(path, policy)
    cfg = RunConfig.from_dict(ckpt["config"])
    paths = OutputPaths(output_root if output_root is not None else _output_root(path))
    started = time.perf_counter()
    if kind == "knn":
        result = knn_probe(student, dataset, policy, k=k)
        entry = {**result, "seconds": time.perf_counter() - started}
    else:
        resolved = config.resolved(kind, cfg.optim.seed)
        identity = probe_identity(kind, student, cfg, resolved, teacher)
        torch.manual_seed(resolved.seed)
        probe = policy.prepare(FrozenEncoderProbe(student.encoder, dataset.num_classes,
                                                  finetune_last_stage=resolved.finetune_last_stage))
        result = fit_probe(probe, kind, dataset, policy, resolved, teacher=teacher, run_config=cfg,
                           paths=paths, name=f"{ckpt['name']}__probe_{kind}", identity=identity, resume=resume)
        entry = {k_: v for k_, v in result.items() if k_ != "log"}
        entry["config"] = dataclasses.asdict(resolved)
        if kind == "kd":
            entry["teacher"] = identity["teacher"]
    if dist.is_main():  # the records only: the student's checkpoint is left as it is
        if result.get("log"):
            save_log(paths, f"{ckpt['name']}__probe_{kind}", result["log"])
        add_probe_result(ckpt, kind, entry, paths.root)
    log.info(f"[{ckpt['name']}] {kind} probe: top-1 {entry['top1']:.2f}% top-5 {entry['top5']:.2f}% "
             f"(online classifier {ckpt['metrics'].get('test_acc')})")
    return {**entry, "log": result["log"]} if "log" in result else entry
