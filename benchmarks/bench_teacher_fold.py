"""The frozen teacher's forward (features and float32 logits, as the training step calls it) with
its BatchNorms folded into the convolutions against the same teacher unfolded, on this machine.

Same weights (BatchNorm statistics drawn away from the identity), same batch, the two alternated
within every repeat; median of --repeats timed forwards after one warm-up each. Random 32x32
inputs, 100 classes. The folded teacher's largest logit difference is printed beside the times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # noqa: F401  (before torch: the OpenMP wait policy)
import torch

from desupcon.engine.devices import DevicePolicy, select_device
from desupcon.models import Teacher, build_encoder

ARCHS = ("resnet50", "ResNet50", "resnet32x4", "wrn_40_2", "vgg13", "MobileNetV2", "ShuffleV1", "ShuffleV2")


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    args = p.parse_args()
    policy = DevicePolicy.choose(select_device(args.device))
    print(f"device {policy.device}, precision {policy.precision}, batch {args.batch_size}, 32x32, "
          f"median of {args.repeats}; threads {torch.get_num_threads()}")
    print(f"{'teacher':12s} {'folded BN':>10s} {'unfolded ms':>12s} {'folded ms':>10s} {'ratio':>6s} {'max |dz|/max |z|':>17s}")
    g = torch.Generator().manual_seed(0)
    for arch in args.archs:
        torch.manual_seed(0)
        encoder = build_encoder(arch, 100)
        with torch.no_grad():
            for m in encoder.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.uniform_(0.5, 2.0, generator=g)
                    m.running_mean.uniform_(-0.5, 0.5, generator=g)
        unfolded = policy.prepare(Teacher(encoder)).eval()
        folded = policy.prepare(Teacher(build_encoder(arch, 100))).eval()
        folded.load_state_dict(unfolded.state_dict())
        count = folded.fold_batchnorm(policy.inputs(torch.randn(2, 3, 32, 32, generator=g).to(policy.device)))
        x = policy.inputs(torch.randn(args.batch_size, 3, 32, 32, generator=g).to(policy.device))
        runs = {"unfolded": [], "folded": []}
        for teacher in (unfolded, folded):
            teacher.features_and_logits(x, policy)  # warm-up
        for _ in range(args.repeats):
            for key, teacher in (("unfolded", unfolded), ("folded", folded)):
                runs[key].append(timed(lambda t=teacher: t.features_and_logits(x, policy), policy.device))
        z0, z1 = unfolded.features_and_logits(x, policy).logits, folded.features_and_logits(x, policy).logits
        err = ((z1 - z0).abs().max() / z0.abs().max()).item()
        a, b = statistics.median(runs["unfolded"]), statistics.median(runs["folded"])
        total = sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
        print(f"{arch:12s} {f'{count}/{total}':>10s} {a:12.1f} {b:10.1f} {b / a:6.2f} {err:17.1e}")


if __name__ == "__main__":
    main()
