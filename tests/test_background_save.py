"""pargo_dist.checkpoint.background_save in-process: the host copy a background save writes, and the writer's
ordering and failure reporting. (The whole protocol, with real ranks, a kill mid-write and a
signal: tests/test_train.py.)"""

from __future__ import annotations

import threading
from collections import OrderedDict

import pytest
import torch

from pargo_dist.checkpoint.background_save import BackgroundWriter, host_snapshot, save_file


def test_the_snapshot_is_the_state_when_taken_with_views_kept_as_views(tmp_path):
    flat = torch.arange(12, dtype=torch.float32)
    state = OrderedDict(a=flat[:6].view(2, 3), b=flat[6:], step=3, nested=[{"m": torch.ones(2)}], empty=torch.empty(0))
    copy = host_snapshot(state)
    flat.mul_(-1)  # training goes on: the live tensors change in place
    state["nested"][0]["m"].add_(5)
    assert torch.equal(copy["a"], torch.arange(6.0).view(2, 3)) and torch.equal(copy["b"], torch.arange(6.0, 12))
    assert torch.equal(copy["nested"][0]["m"], torch.ones(2)) and copy["step"] == 3 and type(copy) is OrderedDict
    assert copy["a"].untyped_storage().data_ptr() == copy["b"].untyped_storage().data_ptr()  # one storage, as saved
    save_file(copy, tmp_path / "x.pt")
    back = torch.load(tmp_path / "x.pt")
    assert torch.equal(back["a"], copy["a"]) and [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_writes_run_in_order_and_the_update_waits_only_for_the_copy(tmp_path):
    writer = BackgroundWriter()
    release, order = threading.Event(), []

    def slow_write(copy):
        release.wait(5)
        order.append(float(copy["x"][0]))

    first = {"x": torch.zeros(3)}
    writer.submit("first", first, slow_write)
    writer.submit("second", {"x": torch.ones(3)}, lambda copy: order.append(float(copy["x"][0])))
    writer.wait_staged()  # both copied while the first write is still held
    first["x"].fill_(7)  # so changing the live tensor no longer matters
    assert writer.pending()
    release.set()
    writer.wait()
    assert order == [0.0, 1.0] and not writer.pending()
    writer.close()


def test_a_failed_write_is_raised_on_the_training_thread_with_its_file(tmp_path):
    writer = BackgroundWriter()
    writer.submit(str(tmp_path / "shard.pt"), {"x": torch.zeros(1)},
                  lambda copy: (_ for _ in ()).throw(OSError("No space left on device")))
    with pytest.raises(RuntimeError, match=r"shard\.pt failed: OSError: No space left on device"):
        writer.wait()
    with pytest.raises(RuntimeError, match="shard.pt"):  # and the next save is refused, not lost silently
        writer.submit("next", {}, lambda copy: None)


def test_the_copies_of_a_save_reuse_one_host_buffer_sized_to_it(tmp_path):
    """The first save copies into memory of its own and sizes the arena; the next one copies into
    the arena (the same memory, each file still holding only its own tensors' bytes, as a
    synchronous save writes them), and the arena is exactly that save, 64-byte aligned, not a
    power of two."""
    writer = BackgroundWriter()
    flat = torch.arange(100, dtype=torch.float32)
    state = {"a": flat[:60].view(6, 10), "b": flat[60:], "c": torch.ones(30, dtype=torch.float64), "step": 1}
    where = []

    def write(copy, path):
        where.append(copy["a"].untyped_storage().data_ptr())
        save_file(copy, path)

    writer.submit("first", state, lambda copy: write(copy, tmp_path / "first.pt"))
    writer.wait()
    assert writer.arena.nbytes == 448 + 256  # 400 bytes and 240 bytes, each aligned to 64
    flat.add_(1)
    writer.submit("second", state, lambda copy: write(copy, tmp_path / "second.pt"))
    writer.wait()
    base = writer.arena.buffer.ctypes.data
    assert base <= where[1] < base + writer.arena.nbytes and not base <= where[0] < base + writer.arena.nbytes
    torch.save(state, tmp_path / "sync.pt")  # what a synchronous save of the same state writes
    second, sync = torch.load(tmp_path / "second.pt"), torch.load(tmp_path / "sync.pt")
    assert all(torch.equal(second[k], sync[k]) for k in "abc") and second["step"] == 1
    assert second["a"].untyped_storage().nbytes() == 400  # its own storage, not the arena's
    assert abs((tmp_path / "second.pt").stat().st_size - (tmp_path / "sync.pt").stat().st_size) < 64
    writer.close()
