"""CKA, prediction statistics and mutual information (desupcon/compare.py) against naive float64
evaluations, closed forms and invariances."""

import itertools
from pathlib import Path
import math

import numpy as np
import pytest
import torch

from desupcon.analysis import compare as C


def _data(n=200, p=12, q=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    mix = torch.randn(p, q, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ mix) + 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return x, y


def _orthogonal(p, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    return q


# ------------------------------------------------------------------------------------------------
# CKA
# ------------------------------------------------------------------------------------------------

def naive_linear_cka(x, y):
    """Centred Gram matrices built entry by entry, HSIC = sum_ij K~_ij L~_ij."""
    x, y = x.tolist(), y.tolist()
    n = len(x)

    def centred_gram(rows):
        means = [sum(col) / n for col in zip(*rows)]
        c = [[v - m for v, m in zip(r, means)] for r in rows]
        return [[sum(a * b for a, b in zip(c[i], c[j])) for j in range(n)] for i in range(n)]
    k, l = centred_gram(x), centred_gram(y)

    def inner(a, b):
        return sum(a[i][j] * b[i][j] for i in range(n) for j in range(n))
    return inner(k, l) / math.sqrt(inner(k, k) * inner(l, l))


def naive_rbf_kernel(x, factor):
    rows = x.tolist()
    n = len(rows)
    dist = [[math.dist(rows[i], rows[j]) for j in range(n)] for i in range(n)]
    pairs = sorted(dist[i][j] for i in range(n) for j in range(i + 1, n))
    m = len(pairs)
    median = pairs[m // 2] if m % 2 else 0.5 * (pairs[m // 2 - 1] + pairs[m // 2])
    sigma = factor * median
    return [[math.exp(-dist[i][j] ** 2 / (2 * sigma ** 2)) for j in range(n)] for i in range(n)]


def naive_kernel_cka(k, l):
    n = len(k)
    h = [[(1.0 if i == j else 0.0) - 1.0 / n for j in range(n)] for i in range(n)]

    def mm(a, b):
        return [[sum(a[i][t] * b[t][j] for t in range(n)) for j in range(n)] for i in range(n)]

    def hsic(a, b):
        prod = mm(mm(mm(a, h), b), h)
        return sum(prod[i][i] for i in range(n)) / (n - 1) ** 2
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def naive_unbiased_hsic(k, l):
    """The U-statistic over ordered quadruples of distinct indices (Song et al. 2012)."""
    n = len(k)
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i][j] * l[i][j] + k[i][j] * l[q][r] - 2 * k[i][j] * l[i][q]
        count += 1
    return total / count


def test_linear_cka_matches_a_naive_loop_in_both_forms():
    x, y = _data(n=25, p=6, q=4)
    want = naive_linear_cka(x, y)
    assert C.linear_cka(x, y) == pytest.approx(want, abs=1e-12)  # feature-space form (n > p, q)
    wide_x, wide_y = _data(n=9, p=40, q=30, seed=1)  # Gram form (n smaller than p and q)
    assert C.linear_cka(wide_x, wide_y) == pytest.approx(naive_linear_cka(wide_x, wide_y), abs=1e-12)


def test_rbf_cka_matches_a_naive_kernel_computation():
    x, y = _data(n=20, p=5, q=3, seed=2)
    for factor in (0.5, 1.0, 2.0):
        want = naive_kernel_cka(naive_rbf_kernel(x, factor), naive_rbf_kernel(y, factor))
        assert C.rbf_cka(x, y, factor) == pytest.approx(want, abs=1e-10)


def test_unbiased_hsic_is_the_u_statistic():
    x, y = _data(n=7, p=3, q=2, seed=3)
    k, l = x @ x.T, y @ y.T
    assert float(C.unbiased_hsic(k, l)) == pytest.approx(naive_unbiased_hsic(k.tolist(), l.tolist()), abs=1e-10)


@pytest.mark.parametrize("cka", [C.linear_cka, C.rbf_cka, C.unbiased_cka])
def test_cka_of_a_representation_with_itself_and_its_invariances(cka):
    x, y = _data(n=120, p=10, q=6, seed=4)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-10)
    base = cka(x, y)
    assert 0 < base < 1
    assert cka(x @ _orthogonal(10, 5), y) == pytest.approx(base, abs=1e-10)  # orthogonal transform
    assert cka(7.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)  # isotropic scaling
    assert cka(y, x) == pytest.approx(base, abs=1e-10)  # symmetric


def test_minibatch_cka_agrees_with_the_full_unbiased_estimator():
    x, y = _data(n=2000, p=16, q=8, seed=6)
    full = C.unbiased_cka(x, y)
    one = C.MinibatchCKA(1, 1)
    one.update([x], [y])
    assert float(one.result()[0, 0]) == full  # one minibatch of everything is the full estimator
    acc = C.MinibatchCKA(2, 2)
    for start in range(0, 2000, 250):
        part = slice(start, start + 250)
        acc.update([x[part], x[part] ** 2], [y[part], x[part]])
    matrix = acc.result()
    assert float(matrix[0, 0]) == pytest.approx(full, abs=0.02)
    assert float(matrix[0, 1]) == pytest.approx(1.0, abs=1e-12)  # layer 0 of A is layer 1 of B
    assert float(matrix[1, 0]) == pytest.approx(C.unbiased_cka(x ** 2, y), abs=0.03)
    # the linear (biased) CKA converges to the same value at this n
    assert C.linear_cka(x, y) == pytest.approx(full, abs=0.02)


# ------------------------------------------------------------------------------------------------
# Prediction statistics
# ------------------------------------------------------------------------------------------------

def test_mcnemar_against_the_exact_binomial_by_hand():
    # b = 3, c = 10: p = 2 * sum_{i<=3} C(13, i) / 2^13 = 2 * (1 + 13 + 78 + 286) / 8192
    assert C.mcnemar_exact(3, 10) == pytest.approx(2 * 378 / 8192, rel=1e-12)
    assert C.mcnemar_exact(10, 3) == C.mcnemar_exact(3, 10)
    assert C.mcnemar_exact(5, 5) == 1.0 and C.mcnemar_exact(0, 0) == 1.0
    assert C.mcnemar_exact(0, 6) == pytest.approx(2 / 64, rel=1e-12)


def test_prediction_statistics_on_constructed_predictions():
    labels = [0, 0, 1, 1, 2, 2, 0, 1]
    a = [0, 0, 1, 2, 2, 1, 1, 1]  # right: 0 1 2 4 7
    b = [0, 1, 1, 1, 2, 0, 0, 2]  # right: 0 2 3 4 6
    out = C.prediction_statistics(a, b, labels, class_names=["x", "y", "z"])
    assert out["accuracy_a"] == pytest.approx(62.5) and out["accuracy_b"] == pytest.approx(62.5)
    assert (out["both_right"], out["only_a_right"], out["only_b_right"], out["both_wrong"]) == (3, 2, 2, 1)
    assert out["agreement"] == pytest.approx(100 * 3 / 8)  # images 0, 2, 4
    # kappa: p_o = 3/8; a predicts (2, 4, 2)/8, b (3, 3, 2)/8 -> p_e = (6 + 12 + 4) / 64
    p_e = 22 / 64
    assert out["kappa"] == pytest.approx((3 / 8 - p_e) / (1 - p_e), abs=1e-12)
    assert out["mcnemar_p"] == 1.0
    first = out["classes_differing_most"][0]  # per class: x 2/3 vs 2/3, y 2/3 vs 2/3, z 1/2 vs 1/2
    assert {r["class"] for r in out["classes_differing_most"]} == {"x", "y", "z"} and first["difference"] == 0
    lopsided = C.prediction_statistics([0, 1, 2, 0], [1, 1, 1, 1], [0, 1, 2, 0])
    assert lopsided["classes_differing_most"][0] == {"class": "0", "images": 2, "accuracy_a": 100.0,
                                                     "accuracy_b": 0.0, "difference": 100.0}
    assert C.prediction_statistics(a, a, labels)["kappa"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Mutual information
# ------------------------------------------------------------------------------------------------

def _correlated(n, pairs, rho, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, pairs))
    y = rho * x + math.sqrt(1 - rho ** 2) * rng.standard_normal((n, pairs))
    return x, y


@pytest.mark.parametrize("pairs, rho, below, above", [(1, 0.9, 0.04, 0.04), (2, 0.6, 0.05, 0.05),
                                                      (4, 0.5, 0.15, 0.03)])
def test_ksg_against_correlated_gaussians(pairs, rho, below, above):
    """Within KSG's known bias at n = 2,000: small in 2 or 4 joint dimensions, downward in 8."""
    x, y = _correlated(2000, pairs, rho, seed=pairs)
    exact = -0.5 * pairs * math.log(1 - rho ** 2)
    assert exact - below < C.ksg_mutual_information(x, y, k=3) < exact + above


def test_ksg_of_independent_variables_is_near_zero():
    x, _ = _correlated(2000, 2, 0.0, seed=9)
    _, y = _correlated(2000, 2, 0.0, seed=10)
    assert abs(C.ksg_mutual_information(x, y)) < 0.03


def test_mixed_estimator_between_separated_and_independent_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2000)
    separated = rng.standard_normal((2000, 3)) + 50.0 * labels[:, None]  # the label is a function of x
    assert C.mixed_mutual_information(separated, labels) == pytest.approx(math.log(4), abs=0.02)
    noise = rng.standard_normal((2000, 3))
    assert abs(C.mixed_mutual_information(noise, labels)) < 0.03
    # half the separation: between 0 and log 4
    mid = C.mixed_mutual_information(rng.standard_normal((2000, 3)) + 1.0 * labels[:, None], labels)
    assert 0.1 < mid < math.log(4) - 0.1


def test_pca_scores_carry_the_top_variances_in_both_forms():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    for n in (400, 4):  # covariance form, then Gram form (n < p)
        x = torch.randn(n, 6, generator=g, dtype=torch.float64) * scales @ _orthogonal(6, 1)
        scores = C.pca(x, 3)
        centred = x - x.mean(0)
        top = torch.linalg.svdvals(centred)[:3] ** 2
        d = min(3, n)
        assert np.allclose((scores ** 2).sum(0)[:d], top[:d].numpy(), rtol=1e-8)
        assert np.allclose(scores.T @ scores - np.diag(np.diag(scores.T @ scores)), 0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The commands on two quick-preset runs
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_config):
    from desupcon.session import Session
    root = tmp_path_factory.mktemp("compare")
    cfg = tiny_config(root, epochs=1)
    session = Session(cfg, analyze=False)
    results = session.run_many([cfg.replace(method={"method": m}) for m in ("lw-supcrd", "ce")])
    return root, results


def test_compare_command_writes_the_named_fields(two_runs, tmp_path, capsys):
    from desupcon.store.checkpoint import read_json
    from desupcon.cli import main
    from desupcon.analysis.compare_models import load_saved_model, run_test_pass
    from desupcon.engine.devices import DevicePolicy
    from desupcon.engine.dataset import prepare_dataset
    root, (lw, ce) = two_runs
    out_json = tmp_path / "cmp.json"
    assert main(["compare", lw.name, str(ce.checkpoint), "--output-dir", str(root), "--device", "cpu",
                 "--json", str(out_json), "--mi-dims", "4"]) == 0
    printed = capsys.readouterr().out
    assert "McNemar exact p" in printed and "agreement" in printed
    out = read_json(out_json)
    for key in ("accuracy_a", "accuracy_b", "agreement", "both_right", "only_a_right", "only_b_right",
                "both_wrong", "kappa", "mcnemar_p", "cka_linear"):
        assert key in out, key
    assert out["both_right"] + out["only_a_right"] + out["only_b_right"] + out["both_wrong"] == out["n"] == 64
    # the accuracies are the runs' own last-epoch test accuracies (same images, same models)
    assert out["accuracy_a"] == pytest.approx(lw.metrics["test_acc"]) and out["accuracy_b"] == pytest.approx(
        ce.metrics["test_acc"])
    assert out["mutual_information"]["d"] == 4 and out["mutual_information"]["k"] == 3
    assert list((root / "json_results" / "compare").glob("*.json"))
    # the statistics follow from the predictions of one pass
    policy = DevicePolicy.choose(torch.device("cpu"))
    a, b = load_saved_model(lw.name, root, policy), load_saved_model(ce.name, root, policy)
    result = run_test_pass(a, b, prepare_dataset(a.cfg, policy.device), policy, layers=False)
    pa, pb = result.predictions
    assert out["agreement"] == pytest.approx(100 * float((pa == pb).double().mean()))
    assert out["cka_linear"] == pytest.approx(C.linear_cka(*result.features))


def test_similarity_command_against_the_teacher(two_runs, capsys):
    from desupcon.store.checkpoint import read_json
    from desupcon.cli import main
    root, (lw, _) = two_runs
    assert main(["similarity", lw.name, "teacher", "--output-dir", str(root), "--device", "cpu"]) == 0
    saved = read_json(next((root / "json_results" / "similarity").glob("*.json")))
    assert saved["layers_a"] == ["layer1", "layer2", "layer3", "projection"] == saved["layers_b"]
    matrix = np.array(saved["cka"])
    assert matrix.shape == (4, 4) and np.isfinite(matrix).all()
    assert Path(saved["heatmap"]).is_file() and saved["n"] == 64
    # the same model against itself: ones on the diagonal
    assert main(["similarity", lw.name, lw.name, "--output-dir", str(root), "--device", "cpu",
                 "--json", str(root / "self.json")]) == 0
    assert np.allclose(np.diag(read_json(root / "self.json")["cka"]), 1.0)


def test_compare_bad_inputs_are_one_line(two_runs, tmp_path, capsys, tiny_config):
    from desupcon.cli import main
    from desupcon.session import Session
    root, (lw, ce) = two_runs
    assert main(["compare", lw.name, "no_such_run", "--output-dir", str(root), "--device", "cpu"]) == 2
    assert "no_such_run: neither a checkpoint file nor a run name" in capsys.readouterr().err
    other = tiny_config(tmp_path, test_images=32, epochs=1).replace(method={"method": "ce"})
    [small] = Session(other, analyze=False).run_many([other])
    assert main(["compare", str(small.checkpoint), str(ce.checkpoint), "--device", "cpu"]) == 2
    assert "different test data (test_subset 32 vs 64)" in capsys.readouterr().err
    assert main(["compare", "teacher", "teacher", "--output-dir", str(root), "--device", "cpu"]) == 2
    assert "give a student as the other one" in capsys.readouterr().err
    # bounds known only with the data: the KSG estimator's k below the 64 test images, k-NN's k at
    # most the 160 training images; both refused before the models' pass over the data
    assert main(["compare", lw.name, ce.name, "--output-dir", str(root), "--device", "cpu", "--mi-k", "64"]) == 2
    assert "--mi-k 64 is out of range for 64 test images" in capsys.readouterr().err
    assert main(["probe", lw.name, "--kind", "knn", "--k", "161", "--output-dir", str(root), "--device", "cpu"]) == 2
    assert "--k 161 is out of range for 160 training images" in capsys.readouterr().err


def test_report_shows_agreement_with_the_teacher_and_mcnemar_against_ce(tmp_path, tiny_config):
    from desupcon import report
    from desupcon.session import Session
    cfg = tiny_config(tmp_path, epochs=1)
    session = Session(cfg, pictures=False)
    session.analyze_teacher()
    lw, ce = session.run_many([cfg.replace(method={"method": m}) for m in ("lw-supcrd", "ce")])
    records = report.load_records(tmp_path)
    teacher = next(r for r in records.values() if r["kind"] == "teacher")
    r_lw, r_ce = records[lw.name], records[ce.name]
    labels = r_lw["test_labels"]
    assert labels == r_ce["test_labels"] == teacher["test_labels"] and len(labels) == 64
    # the stored predictions are the models' own: their accuracy is the run's test accuracy
    assert 100 * sum(p == y for p, y in zip(r_lw["test_predictions"], labels)) / 64 == pytest.approx(
        lw.metrics["test_acc"])
    agreement = 100 * sum(a == b for a, b in zip(r_lw["test_predictions"], teacher["test_predictions"])) / 64
    only_lw = sum(a == y != b for a, b, y in zip(r_lw["test_predictions"], r_ce["test_predictions"], labels))
    only_ce = sum(b == y != a for a, b, y in zip(r_lw["test_predictions"], r_ce["test_predictions"], labels))
    text = report.build_report(tmp_path, tables=["main"])
    header = next(l for l in text.splitlines() if l.startswith("| run"))
    row = next(l for l in text.splitlines() if l.startswith("| LW-SupCRD"))
    cells = dict(zip([h.strip() for h in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["agreement with teacher %"] == f"{agreement:.2f}"
    assert cells["McNemar p (exact, per shared seed)"] == f"{C.mcnemar_exact(only_lw, only_ce):.2g} vs CE student"
