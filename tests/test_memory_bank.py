"""Tests of desupcon.memory_bank.MomentumMemoryBank (SPEC section 5)."""

import io
import math
from collections import Counter

import numpy as np
import pytest
import torch

from desupcon.memory_bank import MomentumMemoryBank

SIZE, DIM, N_CLASSES = 40, 8, 5


def make_labels(size=SIZE, seed=0):
    return torch.randint(0, N_CLASSES, (size,), generator=torch.Generator().manual_seed(seed)).to(torch.int64)


def make_bank(momentum=0.5, size=SIZE, dim=DIM, seed=0):
    return MomentumMemoryBank(size, dim, make_labels(size, seed), momentum=momentum)


def random_embeddings(n, dim=DIM, seed=0, scale=2.0):
    """Deliberately not unit norm: update() averages what it is given, then normalises."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale


def naive_update(old, indices, embeddings, m):
    """float64 reference of one update.

    For every distinct index i among `indices`:
        slot_i <- normalise( m * slot_i + (1 - m) * mean{ embeddings[r] : indices[r] = i } )
    Other slots are unchanged.
    """
    new = np.array(old, dtype=np.float64, copy=True)
    groups = {}
    for row, idx in enumerate(indices.tolist()):
        groups.setdefault(idx, []).append(embeddings[row].double().numpy())
    for idx, rows in groups.items():
        mean = [sum(r[c] for r in rows) / len(rows) for c in range(len(rows[0]))]
        v = [m * new[idx][c] + (1 - m) * mean[c] for c in range(len(mean))]
        norm = math.sqrt(sum(x * x for x in v))
        new[idx] = [x / norm for x in v]
    return new


def write_slots(bank, slots, seed=0):
    slots = torch.as_tensor(slots, dtype=torch.int64)
    bank.update(slots, random_embeddings(len(slots), bank.embeddings.shape[1], seed=seed))


def draw(bank, k, exclude=None, seed=0):
    """One sample with a fresh generator; returns (embeddings, labels, slot indices)."""
    emb, lab = bank.sample(k, exclude=exclude, generator=torch.Generator().manual_seed(seed))
    return emb, lab, bank.last_sampled_indices.clone()


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------


def test_initial_state():
    labels = make_labels()
    bank = MomentumMemoryBank(SIZE, DIM, labels, momentum=0.5)
    assert bank.embeddings.shape == (SIZE, DIM) and bank.embeddings.is_floating_point()
    assert torch.count_nonzero(bank.embeddings) == 0  # slots start at zero
    assert bank.labels.dtype == torch.int64 and torch.equal(bank.labels.cpu(), labels)
    assert bank.written.dtype == torch.bool and bank.written.device.type == "cpu"
    assert bank.written.shape == (SIZE,) and not bank.written.any()


@pytest.mark.parametrize("n_labels", [SIZE - 1, SIZE + 1, 0])
def test_size_labels_mismatch_raises(n_labels):
    with pytest.raises(ValueError):
        MomentumMemoryBank(SIZE, DIM, torch.zeros(n_labels, dtype=torch.int64))


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_momentum_outside_unit_interval_raises(momentum):
    with pytest.raises(ValueError):
        make_bank(momentum=momentum)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.999])
def test_momentum_inside_unit_interval_is_accepted(momentum):
    make_bank(momentum=momentum)


# --------------------------------------------------------------------------------------
# Momentum update
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_update_matches_naive(momentum):
    bank = make_bank(momentum)
    expected = np.zeros((SIZE, DIM))
    # step 1: slots 3 and 9 appear twice (two views), 5 and 7 once
    idx1 = torch.tensor([3, 5, 3, 7, 9, 9])
    emb1 = random_embeddings(6, seed=1)
    bank.update(idx1, emb1)
    expected = naive_update(expected, idx1, emb1, momentum)
    np.testing.assert_allclose(bank.embeddings.cpu().double().numpy(), expected, rtol=0, atol=1e-6)
    # first write of a slot: normalise(mean) whatever the momentum (slots start at zero)
    mean3 = (emb1[0] + emb1[2]).double() / 2
    np.testing.assert_allclose(bank.embeddings[3].cpu().double().numpy(), (mean3 / mean3.norm()).numpy(), atol=1e-6)
    # step 2: slots 3 and 5 written a second time (5 with two views), slot 0 for the first time
    idx2 = torch.tensor([5, 3, 0, 5])
    emb2 = random_embeddings(4, seed=2)
    bank.update(idx2, emb2)
    expected = naive_update(expected, idx2, emb2, momentum)
    np.testing.assert_allclose(bank.embeddings.cpu().double().numpy(), expected, rtol=0, atol=1e-6)
    # every written slot is a unit vector, every other slot still zero
    norms = bank.embeddings.norm(dim=1).cpu()
    written = torch.zeros(SIZE, dtype=torch.bool)
    written[[0, 3, 5, 7, 9]] = True
    torch.testing.assert_close(norms[written], torch.ones(5), rtol=0, atol=1e-6)
    assert torch.count_nonzero(bank.embeddings[~written.to(bank.embeddings.device)]) == 0
    assert torch.equal(bank.written, written)


def test_second_update_uses_momentum():
    """Guard: after a second write, a slot differs from normalise(new mean) when m > 0."""
    bank = make_bank(0.5)
    bank.update(torch.tensor([4, 4]), random_embeddings(2, seed=3))
    emb = random_embeddings(2, seed=4)
    bank.update(torch.tensor([4, 4]), emb)
    fresh = emb.double().mean(0)
    fresh = fresh / fresh.norm()
    assert (bank.embeddings[4].cpu().double() - fresh).abs().max() > 1e-2


def test_update_detaches_embeddings():
    source = random_embeddings(4, seed=5).requires_grad_(True)
    bank = make_bank()
    bank.update(torch.tensor([1, 2, 1, 2]), source * 2.0)
    assert not bank.embeddings.requires_grad and bank.embeddings.grad_fn is None
    emb, _ = bank.sample(2, generator=torch.Generator().manual_seed(0))
    assert not emb.requires_grad


def test_update_does_not_touch_labels():
    bank = make_bank()
    labels = bank.labels.clone()
    write_slots(bank, range(0, SIZE, 2))
    assert torch.equal(bank.labels, labels)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def test_sample_from_empty_bank_returns_nothing():
    bank = make_bank()
    emb, lab = bank.sample(16, generator=torch.Generator().manual_seed(0))
    assert emb.shape == (0, DIM)
    assert lab.shape == (0,)
    assert bank.last_sampled_indices.numel() == 0


def _eligible_setup():
    """Bank with 25 written slots; an exclusion list with written and unwritten slots
    (and a repeat).  Returns (bank, exclude, eligible set)."""
    bank = make_bank()
    perm = torch.randperm(SIZE, generator=torch.Generator().manual_seed(7))
    written = perm[:25]
    write_slots(bank, written, seed=8)
    exclude = torch.cat([written[:4], perm[30:33], written[:1]])  # 4 written + 3 unwritten + a repeat
    eligible = set(written.tolist()) - set(exclude.tolist())
    assert len(eligible) == 21
    return bank, exclude, eligible


def test_sample_only_written_not_excluded_no_duplicates_uniform():
    bank, exclude, eligible = _eligible_setup()
    k, n_draws = 7, 600
    gen = torch.Generator().manual_seed(123)
    counts = Counter()
    for _ in range(n_draws):
        emb, lab = bank.sample(k, exclude=exclude, generator=gen)
        idx = bank.last_sampled_indices
        assert emb.shape == (k, DIM) and lab.shape == (k,)
        chosen = idx.tolist()
        assert len(set(chosen)) == k, "duplicate slot in one sample"
        assert set(chosen) <= eligible, f"sampled unwritten or excluded slots {set(chosen) - eligible}"
        # the rows returned are the slots reported
        assert torch.equal(emb, bank.embeddings[idx.to(bank.embeddings.device)])
        assert torch.equal(lab, bank.labels[idx.to(bank.labels.device)])
        counts.update(chosen)
    # every eligible slot is drawn, each about n_draws * k / 21 = 200 times (sd ~ 12.6)
    assert set(counts) == eligible
    expected = n_draws * k / len(eligible)
    assert all(0.7 * expected < c < 1.3 * expected for c in counts.values()), counts


def test_sample_without_exclude_draws_every_written_slot():
    bank = make_bank()
    written = set(range(0, SIZE, 3))
    write_slots(bank, sorted(written))
    gen = torch.Generator().manual_seed(5)
    seen = set()
    for _ in range(200):
        bank.sample(4, generator=gen)
        chosen = bank.last_sampled_indices.tolist()
        assert set(chosen) <= written and len(set(chosen)) == 4
        seen.update(chosen)
    assert seen == written


@pytest.mark.parametrize("k", [21, 22, 1000])
def test_k_at_least_eligible_returns_all_eligible(k):
    bank, exclude, eligible = _eligible_setup()
    emb, lab, idx = draw(bank, k, exclude)
    assert emb.shape == (len(eligible), DIM) and lab.shape == (len(eligible),)
    assert sorted(idx.tolist()) == sorted(eligible)


def test_sample_after_partial_writes_grows_with_written_slots():
    bank = make_bank()
    write_slots(bank, [1, 2, 3])
    assert sorted(draw(bank, 10)[2].tolist()) == [1, 2, 3]
    write_slots(bank, [2, 30], seed=1)
    assert sorted(draw(bank, 10)[2].tolist()) == [1, 2, 3, 30]


def test_same_seed_same_sample():
    bank, exclude, _ = _eligible_setup()
    a = draw(bank, 9, exclude, seed=42)
    b = draw(bank, 9, exclude, seed=42)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # and the seed matters
    others = [tuple(draw(bank, 9, exclude, seed=s)[2].tolist()) for s in range(10)]
    assert len(set(others)) > 1


# --------------------------------------------------------------------------------------
# State round trip
# --------------------------------------------------------------------------------------


def test_state_dict_round_trip():
    bank = make_bank(momentum=0.5, seed=0)
    write_slots(bank, [0, 1, 2, 2, 5, 8, 13, 21, 34], seed=1)
    write_slots(bank, [2, 5, 5, 6], seed=2)
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)  # a checkpoint goes through torch.save / torch.load
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)

    # a different momentum and different labels: everything must come from the state
    restored = MomentumMemoryBank(SIZE, DIM, make_labels(seed=99), momentum=0.9)
    assert not torch.equal(restored.labels, bank.labels)
    restored.load_state_dict(state)
    assert torch.equal(restored.embeddings.cpu(), bank.embeddings.cpu())
    assert torch.equal(restored.labels.cpu(), bank.labels.cpu())
    assert torch.equal(restored.written, bank.written)

    # identical samples with the same seed
    exclude = torch.tensor([1, 6])
    for seed in range(3):
        for x, y in zip(draw(bank, 4, exclude, seed), draw(restored, 4, exclude, seed)):
            assert torch.equal(x, y)

    # the momentum came back too: the same update gives the same slots
    idx, emb = torch.tensor([2, 8, 8, 30]), random_embeddings(4, seed=3)
    bank.update(idx, emb)
    restored.update(idx, emb)
    torch.testing.assert_close(restored.embeddings, bank.embeddings, rtol=0, atol=1e-7)
    assert torch.equal(restored.written, bank.written)
