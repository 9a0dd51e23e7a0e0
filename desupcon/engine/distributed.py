"""One run on several GPUs (SPEC 15): torchrun's process group, DistributedDataParallel, and the
gathers that let the contrastive losses see the global batch.

Launched with `torchrun --nproc-per-node G desupcon.py train ...`, every process takes its slice
of each global batch (the same seeded order and augmentation parameters on every rank), the model
is wrapped in DistributedDataParallel (optionally with SyncBatchNorm), and a contrastive method
gathers embeddings, teacher logits, labels and image indices from all ranks with a gradient-
carrying all-gather, in the layout [view 1 of the global batch; view 2 of the global batch], so
its loss equals the single-process loss on the same global batch. Every rank computes that same
loss; the all-gather's backward sums the ranks' gradients and DDP averages them, which gives
exactly the single-process gradient. The memory bank is updated with the gathered indices and
embeddings, so it stays identical on every rank. Only rank 0 writes files.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as torch_dist
import torch.nn as nn


_SOLO = False  # inside `solo()`: this process works alone, the others are not taking part


def active() -> bool:
    return (not _SOLO and torch_dist.is_available() and torch_dist.is_initialized()
            and torch_dist.get_world_size() > 1)


@contextlib.contextmanager
def solo():
    """Work that one process does alone while the others wait (rank 0 loading a cached teacher to
    send them): no collective inside, every function here a no-op as in a single process."""
    global _SOLO
    previous, _SOLO = _SOLO, True
    try:
        yield
    finally:
        _SOLO = previous


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        torch_dist.barrier()


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (the others' are ignored): one decision for all, e.g. the epoch
    a run resumes from, read from rank 0's checkpoint even where the others' disks hold none."""
    if not active():
        return obj
    box = [obj if rank() == 0 else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device_name: str) -> str:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); returns this rank's device name."""
    if not launched_by_torchrun() or active():
        return device_name
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return f"cuda:{local_rank}" if cuda else "cpu"


def shutdown() -> None:
    if active():
        torch_dist.destroy_process_group()


def wrap_model(model: nn.Module, policy, method, sync_batchnorm: bool = False):
    """The callable that runs the model's forward: DDP around it on several ranks, else itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    cuda = policy.device.type == "cuda"
    # A CE method never reaches the projector, so DDP must not wait for its gradients.
    return DistributedDataParallel(model, device_ids=[policy.device.index] if cuda else None,
                                   find_unused_parameters=not method.needs.every_parameter)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's part (the
    backward sums every rank's gradient for it). `torch.distributed.nn`'s all-gather works on
    both NCCL and gloo (the functional collectives' reduce-scatter backward does not on gloo)."""
    import warnings

    from torch.distributed.nn.functional import all_gather
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _gather_views(x: torch.Tensor, views: int, gather) -> torch.Tensor:
    """[v1_r; v2_r] on every rank r -> [v1_0; v1_1; ...; v2_0; v2_1; ...]."""
    return torch.cat([gather(part) for part in x.chunk(views)], dim=0)


def gather_step_outputs(outputs, needs):
    """The step's outputs over the global batch, for methods whose loss couples samples (`needs`:
    the method's `Needs`; the maps stay per process: no method that gathers reads them)."""
    if not active() or not needs.gathers_batch:
        return outputs
    views = needs.views
    device = outputs.student_projection.device
    outputs.classifier_labels = outputs.classifier_labels if outputs.classifier_labels is not None \
        else outputs.labels[:outputs.labels.shape[0] // views]
    outputs.student_projection = _gather_views(outputs.student_projection, views, all_gather_with_grad)
    if outputs.teacher_projection is not None:
        outputs.teacher_projection = _gather_views(outputs.teacher_projection, views, all_gather_with_grad)
    if outputs.teacher_logits is not None:
        outputs.teacher_logits = _gather_views(outputs.teacher_logits, views, all_gather_no_grad)
    outputs.labels = _gather_views(outputs.labels, views, all_gather_no_grad)
    if outputs.indices is not None:
        outputs.indices = all_gather_no_grad(outputs.indices.to(device)).cpu()
    return outputs


def average_gradients(modules) -> None:
    """Average the gradients of modules outside DDP (the teacher head, a method's own heads)."""
    if not active():
        return
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if not active() or not tensors:
        return tensors
    stacked = torch.stack([t.double() for t in tensors])
    torch_dist.all_reduce(stacked)
    return list(stacked.unbind(0))


def max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if not active():
        return t
    t = t.clone()
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t
