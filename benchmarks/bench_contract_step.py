"""Median milliseconds per training step of three methods (LW-SupCRD, KD, CRD) on the quick preset
(resnet14 -> resnet8, digits at 32x32, batch 64, one thread): the same figure from two checkouts,
to compare the engine before and after a change in one sitting, runs alternating:

    for i in 1 2 3; do PYTHONPATH=NEW python benchmarks/bench_contract_step.py
                       PYTHONPATH=OLD python benchmarks/bench_contract_step.py; done
"""
import statistics
import time

import torch

torch.set_num_threads(1)

from desupcon import data  # noqa: E402
from desupcon.config import preset  # noqa: E402
from desupcon.engine.build import make_student_run  # noqa: E402
from desupcon.engine.devices import as_policy  # noqa: E402
from desupcon.engine.step import train_step  # noqa: E402
from desupcon.models import Teacher, build_encoder  # noqa: E402

cfg = preset("quick").replace(device="cpu", optim={"batch_size": 64})
ds = data.load_dataset("digits", image_size=32)
policy = as_policy("cpu")
torch.manual_seed(0)
teacher = Teacher(build_encoder(cfg.model.teacher_arch, ds.num_classes)).eval()
aug = data.TwoViewAugment(ds.mean, ds.std)
batch = next(data.epoch_batches(ds.train_images, ds.train_labels, 64, aug, torch.Generator().manual_seed(0)))
out = []
for method in ("lw-supcrd", "kd", "crd"):
    run = make_student_run(cfg.with_method(method), ds, teacher, policy)
    run.start_epoch()
    for _ in range(3):
        train_step([run], batch, teacher, policy)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        train_step([run], batch, teacher, policy)
        times.append(time.perf_counter() - start)
    out.append(f"{method} {1000 * statistics.median(times):.1f}")
print(" ".join(out))
