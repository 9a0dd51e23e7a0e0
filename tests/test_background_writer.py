"""The loop's background checkpoint writer: a snapshot at `save` (later in-place changes do not
reach the file), writes in queue order, failures raised at `flush`, everything on disk at close."""

import pytest
import torch

from desupcon.store import checkpoint
from desupcon.store.checkpoint import BackgroundCheckpointWriter, load_checkpoint


def _ckpt(value):
    return {"format": checkpoint.CHECKPOINT_FORMAT, "kind": "in_progress", "w": value, "nested": [value, {"x": value}]}


def test_the_file_holds_the_state_at_save_time(tmp_path):
    path = tmp_path / "a.pth"
    w = torch.zeros(1000)
    with BackgroundCheckpointWriter() as writer:
        writer.save(path, _ckpt(w))
        w.add_(1)  # training goes on in place right after
    saved = load_checkpoint(path)
    assert torch.equal(saved["w"], torch.zeros(1000)) and torch.equal(saved["nested"][1]["x"], torch.zeros(1000))


def test_writes_land_in_queue_order_and_close_waits(tmp_path):
    path = tmp_path / "b.pth"
    writer = BackgroundCheckpointWriter()
    for k in range(5):
        writer.save(path, _ckpt(torch.full((200_000,), float(k))))
    writer.close()
    assert float(load_checkpoint(path)["w"][0]) == 4.0
    assert [p.name for p in tmp_path.iterdir()] == ["b.pth"]  # no temporaries left


def test_a_failed_write_is_raised_at_flush(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    writer = BackgroundCheckpointWriter()
    writer.save(blocker / "c.pth", _ckpt(torch.ones(3)))
    with pytest.raises(OSError):
        writer.flush()
    writer.save(tmp_path / "d.pth", _ckpt(torch.ones(3)))  # the writer goes on after a failure
    writer.close()
    assert (tmp_path / "d.pth").is_file()


def test_an_error_in_the_body_is_kept_and_queued_writes_still_land(tmp_path):
    with pytest.raises(KeyError, match="training failed"):
        with BackgroundCheckpointWriter() as writer:
            writer.save(tmp_path / "e.pth", _ckpt(torch.ones(3)))
            raise KeyError("training failed")
    assert torch.equal(load_checkpoint(tmp_path / "e.pth")["w"], torch.ones(3))
