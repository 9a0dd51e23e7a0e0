"""Tests of desupcon.data (SPEC section 3): batched two-view augmentation and the dataset loaders.

Augmentation is checked against hand-built parameters (identity, corner crop, flip) and against
a naive per-image float64 numpy implementation of the colour-jitter formulas. Loaders are checked
on files written here in each on-disk format (npz folder, torchvision's CIFAR pickles), on the
embedded digits, and on the real CIFAR-10 npz copy when it is present.
"""

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from desupcon.data import (
    AugmentParams,
    DatasetNotFoundError,
    ImageDataset,
    TwoViewAugment,
    epoch_batches,
    load_dataset,
    load_digits_dataset,
    load_npz_dataset,
    normalise,
    subsample,
)

MEAN = torch.tensor([0.5, 0.4, 0.3])
STD = torch.tensor([0.25, 0.2, 0.3])
H = W = 32
PAD = 4

REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _images(b, seed=0, h=H, w=W):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def _params(b, offsets=(PAD, PAD), flip=False, jitter=(1.0, 1.0, 1.0)):
    return AugmentParams(offsets=torch.tensor([list(offsets)] * b, dtype=torch.long),
                         flip=torch.full((b,), bool(flip)),
                         jitter=torch.tensor([list(jitter)] * b, dtype=torch.float32))


def _aug(**kw):
    return TwoViewAugment(MEAN, STD, **kw)


def _naive_normalise(img_float64_chw):
    """(3, H, W) float64 in [0, 1] -> standardised with MEAN/STD, in float64."""
    m = MEAN.double().numpy()[:, None, None]
    s = STD.double().numpy()[:, None, None]
    return (img_float64_chw - m) / s


# --------------------------------------------------------------------------------------------
# Augmentation: parameters
# --------------------------------------------------------------------------------------------


def test_sample_params_cover_every_offset_and_stay_in_range():
    params = _aug().sample_params(2000, torch.Generator().manual_seed(0))
    assert params.offsets.shape == (2000, 2)
    assert params.offsets.dtype == torch.long
    for axis in (0, 1):
        assert sorted(set(params.offsets[:, axis].tolist())) == list(range(2 * PAD + 1))
    # The two axes are drawn independently per sample, not one shared offset.
    assert not torch.equal(params.offsets[:, 0], params.offsets[:, 1])


def test_flip_rate_is_one_half_within_binomial_bound():
    n = 4000
    params = _aug().sample_params(n, torch.Generator().manual_seed(1))
    assert params.flip.dtype == torch.bool and params.flip.shape == (n,)
    flips = int(params.flip.sum())
    bound = 5 * math.sqrt(n * 0.25)  # 5 standard deviations of Binomial(n, 0.5)
    assert abs(flips - n / 2) < bound, flips


def test_jitter_factors_in_range_and_spread():
    params = _aug().sample_params(4000, torch.Generator().manual_seed(2))
    j = params.jitter
    assert j.shape == (4000, 3)
    assert float(j.min()) >= 0.8 and float(j.max()) <= 1.2
    for c in range(3):  # uniform over [0.8, 1.2]: both ends are reached, mean near 1
        assert float(j[:, c].min()) < 0.81 and float(j[:, c].max()) > 1.19
        assert abs(float(j[:, c].mean()) - 1.0) < 0.01
    # brightness, contrast and saturation are independent draws
    assert not torch.equal(j[:, 0], j[:, 1]) and not torch.equal(j[:, 1], j[:, 2])


# --------------------------------------------------------------------------------------------
# Augmentation: apply
# --------------------------------------------------------------------------------------------


def test_output_dtype_and_shape():
    out = _aug()(_images(6), torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    assert out.shape == (6, 3, H, W)
    assert torch.isfinite(out).all()


def test_identity_params_equal_normalise():
    images = _images(5)
    out = _aug().apply(images, _params(5))
    expected = normalise(images, MEAN, STD)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # and normalise itself is (x / 255 - mean) / std
    x = images.double() / 255
    ref = (x - MEAN.double().view(1, 3, 1, 1)) / STD.double().view(1, 3, 1, 1)
    torch.testing.assert_close(expected.double(), ref, rtol=0, atol=1e-5)


def test_corner_crop_shows_zero_padding():
    images = _images(3)
    out = _aug().apply(images, _params(3, offsets=(0, 0)))
    zero_value = (0 - MEAN) / STD  # normalised value of a padded (zero) pixel, per channel
    for c in range(3):
        assert torch.allclose(out[:, c, :PAD, :], zero_value[c].expand(3, PAD, W), atol=1e-6)
        assert torch.allclose(out[:, c, :, :PAD], zero_value[c].expand(3, H, PAD), atol=1e-6)
    # the rest is the image's top-left (H - PAD) x (W - PAD) block, shifted by PAD
    torch.testing.assert_close(out[:, :, PAD:, PAD:],
                               normalise(images, MEAN, STD)[:, :, :H - PAD, :W - PAD],
                               rtol=0, atol=1e-6)


def test_opposite_corner_crop():
    images = _images(2)
    out = _aug().apply(images, _params(2, offsets=(2 * PAD, 2 * PAD)))
    zero_value = (0 - MEAN) / STD
    for c in range(3):
        assert torch.allclose(out[:, c, H - PAD:, :], zero_value[c].expand(2, PAD, W), atol=1e-6)
        assert torch.allclose(out[:, c, :, W - PAD:], zero_value[c].expand(2, H, PAD), atol=1e-6)
    torch.testing.assert_close(out[:, :, :H - PAD, :W - PAD],
                               normalise(images, MEAN, STD)[:, :, PAD:, PAD:], rtol=0, atol=1e-6)


def test_flip_mirrors_columns_exactly():
    images = _images(4)
    aug = _aug()
    for offsets in ((PAD, PAD), (1, 7), (8, 0)):
        plain = aug.apply(images, _params(4, offsets=offsets, flip=False))
        flipped = aug.apply(images, _params(4, offsets=offsets, flip=True))
        assert torch.equal(flipped, plain.flip(-1))
        assert not torch.equal(flipped, plain)


def test_per_sample_params_each_sample_gets_its_own_crop_and_flip():
    """Mixed per-sample parameters equal applying each sample's parameters alone, and each equals
    a crop of the zero-padded image computed by hand."""
    b = 8
    images = _images(b, seed=3)
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0], [4, 4], [1, 6], [7, 2], [3, 5]])
    flip = torch.tensor([False, True, False, True, True, False, True, False])
    params = AugmentParams(offsets, flip, torch.ones(b, 3))
    out = _aug().apply(images, params)
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    norm_padded = normalise(padded, MEAN, STD)
    for i in range(b):
        r, c = offsets[i].tolist()
        expected = norm_padded[i, :, r:r + H, c:c + W]
        if flip[i]:
            expected = expected.flip(-1)
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)
    # all outputs of the same image under different parameters differ
    same = images[:1].expand(b, -1, -1, -1).contiguous()
    out_same = _aug().apply(same, params)
    for i in range(b):
        for k in range(i + 1, b):
            assert not torch.equal(out_same[i], out_same[k]), (i, k)


def test_random_augment_differs_within_batch_of_identical_images():
    image = _images(1, seed=4)
    batch = image.expand(16, -1, -1, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    aug = _aug()
    params = aug.sample_params(16, gen)
    out = aug.apply(batch, params)
    distinct = {tuple(o.flatten()[:: 97].tolist()) for o in out}
    assert len(distinct) == 16
    assert len(set(map(tuple, params.offsets.tolist()))) > 8
    assert 0 < int(params.flip.sum()) < 16


# --------------------------------------------------------------------------------------------
# Colour jitter vs a naive float64 implementation
# --------------------------------------------------------------------------------------------


def _naive_jitter(img, brightness, contrast, saturation):
    """One image (3, H, W) float64 in [0, 1]; torchvision-style formulas, clamp after each."""
    def gray(x):
        return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # (H, W)

    x = np.clip(img * brightness, 0.0, 1.0)
    m = float(gray(x).mean())
    x = np.clip(contrast * x + (1.0 - contrast) * m, 0.0, 1.0)
    g = gray(x)[None]
    return np.clip(saturation * x + (1.0 - saturation) * g, 0.0, 1.0)


@pytest.mark.parametrize("factors", [
    (1.2, 1.0, 1.0), (0.8, 1.0, 1.0), (1.0, 1.2, 1.0), (1.0, 0.8, 1.0),
    (1.0, 1.0, 1.2), (1.0, 1.0, 0.8), (1.17, 0.83, 1.11), (0.85, 1.19, 0.9),
])
def test_colour_jitter_matches_naive_formulas(factors):
    b = 3
    images = _images(b, seed=5, h=8, w=8)
    x = images.float() / 255
    jitter = torch.tensor([factors] * b, dtype=torch.float32)
    out = TwoViewAugment._colour_jitter(x.clone(), jitter)
    for i in range(b):
        f = [float(v) for v in jitter[i]]  # the float32 factors, exactly as the implementation sees
        ref = _naive_jitter(x[i].double().numpy(), *f)
        np.testing.assert_allclose(out[i].double().numpy(), ref, rtol=0, atol=2e-6)
    if factors != (1.0, 1.0, 1.0):
        assert not torch.allclose(out, x)


def test_colour_jitter_per_sample_factors_through_apply():
    """Random per-sample factors through `apply` (centre crop, no flip) equal the naive
    per-image jitter followed by normalisation."""
    b = 6
    images = _images(b, seed=6, h=12, w=12)
    gen = torch.Generator().manual_seed(7)
    jitter = 0.8 + 0.4 * torch.rand(b, 3, generator=gen)
    params = AugmentParams(torch.full((b, 2), PAD, dtype=torch.long), torch.zeros(b, dtype=torch.bool),
                           jitter)
    out = _aug().apply(images, params)
    assert out.shape == (b, 3, 12, 12)
    for i in range(b):
        x = images[i].double().numpy() / 255
        ref = _naive_normalise(_naive_jitter(x, *[float(v) for v in jitter[i]]))
        np.testing.assert_allclose(out[i].double().numpy(), ref, rtol=0, atol=2e-5)


def test_colour_jitter_saturation_zero_gives_gray_and_clamps():
    # Outside the sampled range, but pins the formulas: saturation 0 -> per-pixel grayscale.
    x = torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]])  # one red pixel
    out = TwoViewAugment._colour_jitter(x.clone(), torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(out.flatten(), torch.full((3,), 0.299), atol=1e-6)
    # brightness 1.2 on a white pixel stays clamped at 1
    white = torch.ones(1, 3, 1, 1)
    out = TwoViewAugment._colour_jitter(white.clone(), torch.tensor([[1.2, 1.0, 1.0]]))
    assert torch.equal(out, white)


# --------------------------------------------------------------------------------------------
# epoch_batches
# --------------------------------------------------------------------------------------------


def _collect(n, batch_size, seed=0, views=2, drop_last=True, aug=None):
    images = _images(n, seed=11, h=8, w=8)
    labels = torch.arange(n) % 7
    aug = aug or _aug()
    gen = torch.Generator().manual_seed(seed)
    return images, labels, list(epoch_batches(images, labels, batch_size, aug, gen,
                                              drop_last=drop_last, views=views))


def test_epoch_batches_every_index_once_when_divisible():
    _, labels, batches = _collect(64, 16)
    assert len(batches) == 4
    idx = torch.cat([b[0] for b in batches])
    assert sorted(idx.tolist()) == list(range(64))
    assert not torch.equal(idx, torch.arange(64))  # shuffled
    for i, v1, v2, y in batches:
        assert i.shape == (16,) and v1.shape == (16, 3, 8, 8) and v2.shape == (16, 3, 8, 8)
        assert v1.dtype == torch.float32 and v2.dtype == torch.float32
        assert torch.equal(y, labels[i])
        assert not torch.equal(v1, v2)  # two independent views


def test_epoch_batches_drops_only_the_remainder():
    _, _, batches = _collect(70, 16)
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 16]
    idx = torch.cat([b[0] for b in batches]).tolist()
    assert len(set(idx)) == 64 and len(idx) == 64
    assert set(idx) <= set(range(70))
    # without drop_last the last partial batch is kept and every index appears once
    _, _, batches = _collect(70, 16, drop_last=False)
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 16, 6]
    assert sorted(torch.cat([b[0] for b in batches]).tolist()) == list(range(70))


def test_epoch_batches_dataset_smaller_than_batch_gives_one_batch():
    _, _, batches = _collect(5, 16)
    assert len(batches) == 1
    assert sorted(batches[0][0].tolist()) == list(range(5))


def test_epoch_batches_views_one_gives_none():
    _, labels, batches = _collect(32, 8, views=1)
    assert len(batches) == 4
    for i, v1, v2, y in batches:
        assert v2 is None
        assert v1.shape == (8, 3, 8, 8)
        assert torch.equal(y, labels[i])


def test_epoch_batches_views_are_images_at_indices():
    """With augmentation disabled the views are exactly the normalised images at `indices`."""
    identity = TwoViewAugment(MEAN, STD, padding=0, flip_prob=0.0, jitter=0.0)
    images, labels, batches = _collect(24, 8, aug=identity)
    for i, v1, v2, y in batches:
        expected = normalise(images[i], MEAN, STD)
        torch.testing.assert_close(v1, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(v2, expected, rtol=0, atol=1e-6)
        assert torch.equal(y, labels[i])


def test_epoch_batches_same_seed_same_batches_different_seed_different():
    _, _, a = _collect(48, 16, seed=123)
    _, _, b = _collect(48, 16, seed=123)
    _, _, c = _collect(48, 16, seed=124)
    assert len(a) == len(b) == len(c) == 3
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0])
        assert torch.equal(x[1], y[1])
        assert torch.equal(x[2], y[2])
        assert torch.equal(x[3], y[3])
    assert not torch.equal(torch.cat([x[0] for x in a]), torch.cat([x[0] for x in c]))
    assert not torch.equal(a[0][1], c[0][1])


# --------------------------------------------------------------------------------------------
# Datasets: digits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digits_shapes_dtypes_classes(digits):
    assert digits.name == "digits"
    assert digits.train_images.dtype == torch.uint8 and digits.test_images.dtype == torch.uint8
    assert digits.train_images.shape[1:] == (3, 32, 32) and digits.test_images.shape[1:] == (3, 32, 32)
    assert digits.train_images.shape[0] + digits.test_images.shape[0] == 1797
    assert digits.test_images.shape[0] == 450  # ceil(0.25 * 1797)
    assert digits.train_labels.dtype == torch.long and digits.test_labels.dtype == torch.long
    assert digits.classes == [str(d) for d in range(10)] and digits.num_classes == 10
    assert digits.image_size == 32
    # gray digits replicated into RGB, spanning the full uint8 range
    assert torch.equal(digits.train_images[:, 0], digits.train_images[:, 1])
    assert torch.equal(digits.train_images[:, 1], digits.train_images[:, 2])
    assert int(digits.train_images.max()) >= 250 and int(digits.train_images.min()) == 0
    assert digits.mean.shape == (3,) and digits.std.shape == (3,)
    assert 0.0 < float(digits.mean[0]) < 1.0


def test_digits_split_is_stratified(digits):
    train_counts = torch.bincount(digits.train_labels, minlength=10)
    test_counts = torch.bincount(digits.test_labels, minlength=10)
    assert train_counts.shape == (10,) and (train_counts > 0).all() and (test_counts > 0).all()
    for c in range(10):
        total = int(train_counts[c] + test_counts[c])
        # stratified: each class's test share is 25 % up to rounding (at most one image off)
        assert abs(int(test_counts[c]) - 0.25 * total) <= 1.0, (c, int(test_counts[c]), total)


def test_digits_deterministic_and_seeded(digits):
    again = load_digits_dataset()
    assert torch.equal(again.train_images, digits.train_images)
    assert torch.equal(again.train_labels, digits.train_labels)
    assert torch.equal(again.test_labels, digits.test_labels)
    other = load_digits_dataset(seed=1)
    assert not torch.equal(other.test_labels, digits.test_labels)


# --------------------------------------------------------------------------------------------
# Datasets: npz folder
# --------------------------------------------------------------------------------------------


def _write_npz(folder, n_train=12, n_test=5, h=6, w=5, coarse=True, classes=None, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays = {"images": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
                  "labels": (np.arange(n) % 4).astype(np.int64)}
        if coarse:
            arrays["coarse_labels"] = (np.arange(n) % 2).astype(np.int64)
        np.savez(folder / f"{split}.npz", **arrays)
        data[split] = arrays
    if classes is not None:
        (folder / "classes.json").write_text(json.dumps({"classes": classes}))
    return data


def test_npz_round_trip(tmp_path):
    classes = ["cat", "dog", "emu", "fox"]
    data = _write_npz(tmp_path / "ds", classes=classes)
    ds = load_npz_dataset(tmp_path / "ds")
    assert ds.classes == classes
    for split in ("train", "test"):
        images = getattr(ds, f"{split}_images")
        src = data[split]["images"]
        assert images.dtype == torch.uint8 and images.shape == (src.shape[0], 3, 6, 5)
        for i in range(src.shape[0]):  # NHWC -> NCHW, pixel by pixel
            for c in range(3):
                assert np.array_equal(images[i, c].numpy(), src[i, :, :, c])
        assert getattr(ds, f"{split}_labels").tolist() == data[split]["labels"].tolist()
        assert getattr(ds, f"{split}_labels").dtype == torch.long
        assert getattr(ds, f"{split}_coarse_labels").tolist() == data[split]["coarse_labels"].tolist()
    assert ds.coarse_classes is not None and len(ds.coarse_classes) == 2
    # also through load_dataset("npz:<dir>")
    via = load_dataset(f"npz:{tmp_path / 'ds'}")
    assert torch.equal(via.train_images, ds.train_images) and via.classes == classes


def test_npz_without_classes_json_or_coarse(tmp_path):
    _write_npz(tmp_path / "ds", coarse=False)
    ds = load_npz_dataset(tmp_path / "ds")
    assert ds.classes == ["0", "1", "2", "3"]
    assert ds.train_coarse_labels is None and ds.test_coarse_labels is None
    assert ds.coarse_classes is None


def test_npz_missing_test_file_raises(tmp_path):
    _write_npz(tmp_path / "ds")
    (tmp_path / "ds" / "test.npz").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_npz_dataset(tmp_path / "ds")
    assert "test.npz" in str(info.value)
    assert str(tmp_path / "ds" / "test.npz") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


# --------------------------------------------------------------------------------------------
# Datasets: torchvision's CIFAR pickles
# --------------------------------------------------------------------------------------------


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_rows(n, rng):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar100_from_pickles(tmp_path, accept_cifar_files):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _cifar_rows(7, rng)
    test = _cifar_rows(4, rng)
    # a distinctive pixel: image 3, channel 2 (blue), row 5, column 17
    train[3, :] = 0
    train[3, 2 * 1024 + 5 * 32 + 17] = 201
    train[3, 0 * 1024 + 31 * 32 + 0] = 77  # red, last row, first column
    fine_train, coarse_train = [0, 99, 5, 42, 42, 7, 1], [0, 19, 3, 11, 11, 2, 1]
    fine_test, coarse_test = [99, 0, 3, 50], [19, 0, 2, 10]
    fine_names = [f"fine{i}" for i in range(100)]
    coarse_names = [f"coarse{i}" for i in range(20)]
    _dump(folder / "train", {"data": train, "fine_labels": fine_train, "coarse_labels": coarse_train})
    _dump(folder / "test", {"data": test, "fine_labels": fine_test, "coarse_labels": coarse_test})
    _dump(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    accept_cifar_files(folder)

    ds = load_dataset("cifar100", root=tmp_path, download=False)
    assert ds.name == "cifar100"
    assert ds.train_images.shape == (7, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8
    assert int(ds.train_images[3, 2, 5, 17]) == 201
    assert int(ds.train_images[3, 0, 31, 0]) == 77
    assert int(ds.train_images[3].sum()) == 201 + 77
    # every pixel follows the row-major CHW layout
    i, c, y, x = 5, 1, 20, 3
    assert int(ds.test_images[2, c, y, x]) == int(test[2, c * 1024 + y * 32 + x])
    assert int(ds.train_images[i, c, y, x]) == int(train[i, c * 1024 + y * 32 + x])
    assert ds.train_labels.tolist() == fine_train and ds.test_labels.tolist() == fine_test
    assert ds.train_coarse_labels.tolist() == coarse_train
    assert ds.test_coarse_labels.tolist() == coarse_test
    assert ds.classes == fine_names and ds.num_classes == 100
    assert ds.coarse_classes == coarse_names


def test_cifar10_from_pickles(tmp_path, accept_cifar_files):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches, labels = [], []
    for k in range(1, 6):
        data = _cifar_rows(3, rng)
        data[0, 0] = 10 * k  # red pixel (0, 0) of each batch's first image marks the batch
        lab = [(k + j) % 10 for j in range(3)]
        _dump(folder / f"data_batch_{k}", {"data": data, "labels": lab})
        batches.append(data)
        labels += lab
    test = _cifar_rows(2, rng)
    test[1, 1024 + 32 * 31 + 31] = 250  # green, bottom-right pixel of test image 1
    _dump(folder / "test_batch", {"data": test, "labels": [9, 0]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"label_names": names})
    accept_cifar_files(folder)

    ds = load_dataset("cifar10", root=tmp_path, download=False)
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.test_images.shape == (2, 3, 32, 32)
    assert [int(ds.train_images[3 * (k - 1), 0, 0, 0]) for k in range(1, 6)] == [10, 20, 30, 40, 50]
    assert int(ds.test_images[1, 1, 31, 31]) == 250
    assert int(ds.train_images[7, 2, 9, 4]) == int(batches[2][1, 2 * 1024 + 9 * 32 + 4])
    assert ds.train_labels.tolist() == labels
    assert ds.test_labels.tolist() == [9, 0]
    assert ds.classes == names
    assert ds.train_coarse_labels is None and ds.coarse_classes is None


def test_cifar100_missing_offline_raises_with_guidance(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar100", root=tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / "cifar-100-python") in msg
    assert "--download" in msg and "--data-root" in msg


def test_cifar10_missing_one_batch_raises(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for k in (1, 2, 3, 4):  # data_batch_5 missing
        _dump(folder / f"data_batch_{k}", {"data": np.zeros((1, 3072), np.uint8), "labels": [0]})
    _dump(folder / "test_batch", {"data": np.zeros((1, 3072), np.uint8), "labels": [0]})
    _dump(folder / "batches.meta", {"label_names": [str(i) for i in range(10)]})
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path, download=False)
    assert "cifar-10-batches-py" in str(info.value)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    msg = str(info.value)
    assert "imagenet" in msg
    for name in ("cifar100", "cifar10", "digits", "npz:"):
        assert name in msg


# --------------------------------------------------------------------------------------------
# Real CIFAR-10 (npz folder copy)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (REAL_CIFAR10 / "train.npz").is_file(),
                    reason=f"real CIFAR-10 npz copy not found at {REAL_CIFAR10}")
def test_real_cifar10_npz_loads():
    # shared/'s CIFAR-10 copy: a seeded 10,000-image training subset (1,000 per class), full test set
    ds = load_dataset(f"npz:{REAL_CIFAR10}")
    assert ds.train_images.shape == (10000, 3, 32, 32)
    assert ds.test_images.shape == (10000, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8
    assert ds.classes == CIFAR10_CLASSES
    assert torch.bincount(ds.train_labels, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(ds.test_labels, minlength=10).tolist() == [1000] * 10
    # per-channel training means of CIFAR-10 (125.3, 122.9, 113.9) / 255
    expected = torch.tensor([125.3, 122.9, 113.9]) / 255
    assert torch.allclose(ds.mean, expected, atol=1.0 / 255)
    assert (ds.std > 0.2).all() and (ds.std < 0.3).all()


# --------------------------------------------------------------------------------------------
# subsample
# --------------------------------------------------------------------------------------------


def _indexed_dataset(n_train=200, n_test=60):
    """Image i has red pixel (0, 0) = i % 256 and green (0, 0) = i // 256; label i % 10."""
    def images(n):
        x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
        idx = torch.arange(n)
        x[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
        x[:, 1, 0, 0] = (idx // 256).to(torch.uint8)
        return x

    return ImageDataset("toy", images(n_train), torch.arange(n_train) % 10, images(n_test),
                        torch.arange(n_test) % 10, [str(i) for i in range(10)],
                        torch.arange(n_train) % 10 // 4, torch.arange(n_test) % 10 // 4, ["a", "b", "c"])


def _ids(images):
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


def test_subsample_sizes_and_consistency():
    ds = _indexed_dataset()
    sub = subsample(ds, 50, 20, seed=0)
    assert sub.train_images.shape[0] == 50 and sub.train_labels.shape == (50,)
    assert sub.train_coarse_labels.shape == (50,)
    assert sub.test_images.shape[0] == 20 and sub.test_labels.shape == (20,)
    ids = _ids(sub.train_images)
    assert len(set(ids)) == 50  # without replacement
    assert sub.train_labels.tolist() == [i % 10 for i in ids]
    assert sub.train_coarse_labels.tolist() == [i % 10 // 4 for i in ids]
    test_ids = _ids(sub.test_images)
    assert sub.test_labels.tolist() == [i % 10 for i in test_ids]
    assert ids != list(range(50))  # random, not the first 50
    # the source is untouched
    assert ds.train_images.shape[0] == 200 and ds.test_labels.shape == (60,)
    assert sub.classes == ds.classes


def test_subsample_is_seeded():
    ds = _indexed_dataset()
    a = _ids(subsample(ds, 30, 10, seed=3).train_images)
    b = _ids(subsample(ds, 30, 10, seed=3).train_images)
    c = _ids(subsample(ds, 30, 10, seed=4).train_images)
    assert a == b
    assert a != c


def test_subsample_none_or_too_large_keeps_split():
    ds = _indexed_dataset()
    sub = subsample(ds, None, 1000, seed=0)
    assert torch.equal(sub.train_images, ds.train_images)
    assert torch.equal(sub.test_labels, ds.test_labels)
