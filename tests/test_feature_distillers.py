"""The feature distillers' losses against float64 evaluations written out here sample by sample,
their gradients (gradcheck), the originals' weights, and one epoch of each through the engine."""

import math

import pytest
import torch

from desupcon import losses
from desupcon.config import preset
from desupcon.methods import build_method


def _maps(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _naive_attention(f, p):
    b, c, h, w = f.shape
    out = []
    for i in range(b):
        a = [sum(float(f[i, k, y, x]) ** p for k in range(c)) / c for y in range(h) for x in range(w)]
        norm = max(math.sqrt(sum(v * v for v in a)), 1e-12)
        out.append([v / norm for v in a])
    return out


def test_attention_transfer_equals_a_per_sample_evaluation_with_pooling_to_the_smaller_map():
    s_maps = [_maps(3, 4, 8, 8, seed=1), _maps(3, 5, 4, 4, seed=2)]
    t_maps = [_maps(3, 6, 4, 4, seed=3), _maps(3, 2, 4, 4, seed=4)]  # stage 1: the student's map is larger
    got = losses.attention_transfer_loss(s_maps, t_maps, p=2.0)
    expected = 0.0
    for s, t in zip(s_maps, t_maps):
        if s.shape[2] > t.shape[2]:  # average pooling of 2x2 blocks, written out
            s = s.reshape(3, s.shape[1], t.shape[2], 2, t.shape[2], 2).mean(dim=(3, 5))
        a_s, a_t = _naive_attention(s, 2.0), _naive_attention(t, 2.0)
        diffs = [(x - y) ** 2 for row_s, row_t in zip(a_s, a_t) for x, y in zip(row_s, row_t)]
        expected += sum(diffs) / len(diffs)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_similarity_preserving_equals_a_per_pair_evaluation():
    s, t = _maps(4, 3, 2, 2, seed=5), _maps(4, 7, 2, 2, seed=6)
    xs, xt = s.flatten(1).tolist(), t.flatten(1).tolist()

    def normalised_gram(x):
        g = [[sum(a * b for a, b in zip(u, v)) for v in x] for u in x]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]
    gs, gt = normalised_gram(xs), normalised_gram(xt)
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(4) for j in range(4)) / 16
    assert float(losses.similarity_preserving_loss(s, t)) == pytest.approx(expected, rel=1e-12)


def test_pkt_equals_a_per_pair_evaluation_and_vanishes_for_equal_features():
    s, t, eps = _maps(5, 6, seed=7) - 0.5, _maps(5, 3, seed=8) - 0.5, 1e-7

    def probabilities(x):
        unit = [[v / (math.sqrt(sum(w * w for w in row)) + eps) for v in row] for row in x]
        sim = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in unit] for u in unit]
        return [[v / sum(row) for v in row] for row in sim]
    ps, pt = probabilities(s.tolist()), probabilities(t.tolist())
    expected = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(5) for j in range(5)) / 25
    assert float(losses.pkt_loss(s, t)) == pytest.approx(expected, rel=1e-10)
    assert float(losses.pkt_loss(t, t)) == 0.0


def _smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_equals_a_per_pair_and_per_triplet_evaluation():
    s, t = _maps(5, 4, seed=15), _maps(5, 6, seed=16)

    def distances(x):
        d = [[math.sqrt(max(sum((a - b) ** 2 for a, b in zip(u, v)), 1e-12)) if i != j else 0.0
              for j, v in enumerate(x)] for i, u in enumerate(x)]
        positive = [v for row in d for v in row if v > 0]
        mean = sum(positive) / len(positive)
        return [[v / mean for v in row] for row in d]

    def angles(x):
        def unit(i, j):
            diff = [b - a for a, b in zip(x[i], x[j])]
            n = math.sqrt(sum(v * v for v in diff))
            return [v / max(n, 1e-12) for v in diff]
        n = len(x)
        return [[[sum(a * b for a, b in zip(unit(i, j), unit(i, k))) for k in range(n)] for j in range(n)]
                for i in range(n)]
    ds, dt = distances(s.tolist()), distances(t.tolist())
    as_, at = angles(s.tolist()), angles(t.tolist())
    l_d = sum(_smooth_l1(ds[i][j], dt[i][j]) for i in range(5) for j in range(5)) / 25
    l_a = sum(_smooth_l1(as_[i][j][k], at[i][j][k]) for i in range(5) for j in range(5) for k in range(5)) / 125
    assert float(losses.rkd_loss(s, t, 25.0, 50.0)) == pytest.approx(25 * l_d + 50 * l_a, rel=1e-10)


def test_dist_equals_a_per_row_and_per_column_evaluation():
    z_s, z_t, tau = _maps(6, 5, seed=17) * 6, _maps(6, 5, seed=18) * 6, 4.0

    def softmax(row):
        e = [math.exp(v / tau) for v in row]
        return [v / sum(e) for v in e]

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        a, b = [v - ma for v in a], [v - mb for v in b]
        return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
                                                  + 1e-8)
    ys, yt = [softmax(r) for r in z_s.tolist()], [softmax(r) for r in z_t.tolist()]
    inter = tau ** 2 * (1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / 6)
    cols = lambda y: [[row[c] for row in y] for c in range(5)]  # noqa: E731
    intra = tau ** 2 * (1 - sum(pearson(a, b) for a, b in zip(cols(ys), cols(yt))) / 5)
    assert float(losses.dist_loss(z_s, z_t, tau, 1.0, 1.0)) == pytest.approx(inter + intra, rel=1e-10)
    # equal logits: rho = |a|^2 / (|a|^2 + 1e-8), just below 1 (the centred probabilities have small norms)
    assert 0 < float(losses.dist_loss(z_t, z_t, tau)) < 1e-4


def test_nst_equals_a_per_channel_evaluation():
    s, t = _maps(2, 3, 4, 4, seed=23), _maps(2, 4, 2, 2, seed=24)  # the student's map pooled to 2x2
    s = s.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))

    def channels(x):
        out = []
        for b in range(x.shape[0]):
            rows = [x[b, c].flatten().tolist() for c in range(x.shape[1])]
            out.append([[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in rows])
        return out

    def kernel_mean(a, b):
        values = [sum(x * y for x, y in zip(u, v)) ** 2 for i in range(len(a)) for u in a[i] for v in b[i]]
        return sum(values) / len(values)
    cs, ct = channels(s), channels(t)
    expected = kernel_mean(ct, ct) + kernel_mean(cs, cs) - 2 * kernel_mean(cs, ct)
    got = losses.nst_loss([_maps(2, 3, 4, 4, seed=23)], [t])
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_vid_loss_equals_an_element_by_element_evaluation_and_starts_at_variance_five():
    from desupcon.methods.vid import VariationalRegressor
    mu, t = _maps(2, 3, 2, 2, seed=25), _maps(2, 3, 2, 2, seed=26)
    var = torch.tensor([0.5, 2.0, 5.0], dtype=torch.float64)
    expected = sum(0.5 * ((float(mu[b, c, y, x]) - float(t[b, c, y, x])) ** 2 / float(var[c]) + math.log(var[c]))
                   for b in range(2) for c in range(3) for y in range(2) for x in range(2)) / 24
    assert float(losses.vid_loss(mu, t, var)) == pytest.approx(expected, rel=1e-12)
    regressor = VariationalRegressor(4, 3, initial_variance=5.0)
    torch.testing.assert_close(regressor.variance(), torch.full((3,), 5.0), rtol=0, atol=1e-6)
    assert [type(m).__name__ for m in regressor.mean] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d"]
    assert all(m.bias is None for m in regressor.mean if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("learn", [True, False])
def test_vids_variances_train_unless_fixed(tmp_path, tiny_config, learn):
    from desupcon.session import Session
    from desupcon.store.checkpoint import load_checkpoint
    cfg = tiny_config(tmp_path, epochs=1).with_method("vid", vid_learn_variance=learn)
    ckpt = load_checkpoint(Session(cfg, analyze=False).run(cfg).checkpoint)
    alphas = [v for k, v in ckpt["method_state"].items() if k.endswith(".alpha")]
    start = math.log(math.expm1(5.0 - 1e-5))
    moved = [not torch.allclose(a, torch.full_like(a, start)) for a in alphas]
    assert len(alphas) == 3 and (all(moved) if learn else not any(moved))


@pytest.mark.parametrize("weighted", [False, True])
def test_ttm_and_wttm_equal_a_per_sample_evaluation(weighted):
    z_s, z_t, gamma = _maps(4, 5, seed=29) * 5, _maps(4, 5, seed=30) * 5, 0.1
    total = 0.0
    for row_s, row_t in zip(z_s.tolist(), z_t.tolist()):
        p_t = [math.exp(v) / sum(math.exp(w) for w in row_t) for v in row_t]
        powered = [v ** gamma for v in p_t]
        z = sum(powered)
        target = [v / z for v in powered]
        log_s = [v - math.log(sum(math.exp(w) for w in row_s)) for v in row_s]
        kl = sum(q * (math.log(q) - ls) for q, ls in zip(target, log_s))
        total += z * kl if weighted else kl
    assert float(losses.ttm_loss(z_s, z_t, gamma, weighted)) == pytest.approx(total / 4, rel=1e-10)


def test_cc_equals_a_consecutive_pairs_evaluation():
    e_s, e_t = _maps(5, 3, seed=31), _maps(5, 3, seed=32)
    d = [[abs(a - b) for a, b in zip(u, v)] for u, v in zip(e_s.tolist(), e_t.tolist())]
    expected = sum(d[i][k] * d[i + 1][k] for i in range(4) for k in range(3)) / 4
    assert float(losses.correlation_congruence_loss(e_s, e_t)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss", ["at", "sp", "pkt", "rkd", "dist", "nst", "ttm", "cc"])
def test_gradcheck(loss):
    if loss == "at":
        s, t = _maps(2, 3, 4, 4, seed=9).requires_grad_(), _maps(2, 5, 2, 2, seed=10)
        fn = lambda x: losses.attention_transfer_loss([x], [t])  # noqa: E731
    elif loss == "sp":
        s, t = _maps(3, 2, 2, 2, seed=11).requires_grad_(), _maps(3, 4, 2, 2, seed=12)
        fn = lambda x: losses.similarity_preserving_loss(x, t)  # noqa: E731
    elif loss == "pkt":
        s, t = (_maps(4, 5, seed=13) - 0.5).requires_grad_(), _maps(4, 3, seed=14) - 0.5
        fn = lambda x: losses.pkt_loss(x, t)  # noqa: E731
    elif loss == "rkd":
        s, t = _maps(4, 3, seed=19).requires_grad_(), _maps(4, 5, seed=20)
        fn = lambda x: losses.rkd_loss(x, t)  # noqa: E731
    elif loss == "dist":
        s, t = (_maps(5, 4, seed=21) * 3).requires_grad_(), _maps(5, 4, seed=22) * 3
        fn = lambda x: losses.dist_loss(x, t)  # noqa: E731
    elif loss == "nst":
        s, t = _maps(2, 3, 2, 2, seed=27).requires_grad_(), _maps(2, 2, 2, 2, seed=28)
        fn = lambda x: losses.nst_loss([x], [t])  # noqa: E731
    elif loss == "ttm":
        s, t = (_maps(3, 4, seed=33) * 3).requires_grad_(), _maps(3, 4, seed=34) * 3
        fn = lambda x: losses.ttm_loss(x, t, 0.2, weighted=True)  # noqa: E731
    else:
        s, t = _maps(4, 3, seed=35).requires_grad_(), _maps(4, 3, seed=36)
        fn = lambda x: losses.correlation_congruence_loss(x, t)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("method, weight", [("fitnet", 100.0), ("at", 1000.0), ("sp", 3000.0), ("pkt", 30000.0),
                                            ("rkd", 1.0), ("nst", 50.0), ("vid", 1.0), ("cc", 0.02)])
def test_the_originals_weights_are_the_defaults(method, weight):
    m = preset("mdistiller").with_method(method).method
    assert m.feat_weight == weight and m.ce_weight == 1.0
    if method == "rkd":
        assert (m.rkd_distance, m.rkd_angle) == (25.0, 50.0)
    assert build_method(m).needs.views == 1


def test_dists_cifar_settings_are_the_defaults():
    m = preset("mdistiller").with_method("dist").method
    assert (m.ce_weight, m.kd_weight, m.logit_temperature, m.dist_inter, m.dist_intra) == (1.0, 2.0, 4.0, 1.0, 1.0)


@pytest.mark.parametrize("method", ["at", "sp", "pkt", "rkd", "dist", "nst", "vid", "ttm", "wttm", "cc", "ctkd"])
def test_an_epoch_of_each_through_the_engine(tmp_path, tiny_config, method):
    from desupcon.session import Session
    from desupcon.store.checkpoint import load_checkpoint
    cfg = tiny_config(tmp_path, epochs=1).replace(model={"teacher_arch": "resnet14"}).with_method(method)
    result = Session(cfg, analyze=False).run(cfg)
    log = load_checkpoint(result.checkpoint)["log"][0]
    assert set(log["losses"]) == {"ce", method} and log["losses"][method] > 0 and math.isfinite(log["loss"])


def test_ctkd_temperature_schedule_and_reversed_gradient():
    assert losses.cosine_reversal(1) == pytest.approx((math.cos(math.pi / 10) + 1) / 2 - 1)
    assert losses.cosine_reversal(1) == pytest.approx(-0.0245, abs=1e-4)
    assert losses.cosine_reversal(10) == losses.cosine_reversal(30) == -1.0
    theta = torch.ones((), dtype=torch.float64, requires_grad=True)
    t = losses.curriculum_temperature(theta, -0.5)
    sig = 1 / (1 + math.exp(-1.0))
    assert t.item() == pytest.approx(1 + 20 * sig) and t.item() == pytest.approx(15.62, abs=0.01)
    t.backward()
    assert float(theta.grad) == pytest.approx(-0.5 * 20 * sig * (1 - sig))  # the plain gradient, times -0.5
    m = preset("mdistiller").with_method("ctkd").method
    assert (m.ce_weight, m.kd_weight, m.ctkd_start, m.ctkd_span, m.ctkd_epochs) == (0.1, 0.9, 1.0, 20.0, 10)
    method = build_method(m)
    assert [n for n, _ in method.named_parameters()] == ["theta"] and method.theta.item() == 1.0
