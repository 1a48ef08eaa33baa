"""Streaming from a real S3 server on loopback, over 1 and 2 real ranks (gloo).

Checks what a training run relies on: every sample exactly once per epoch across ranks, a
restored loader continues with the identical next batches (with data.group_by_length on), a
restore with another rank count continues the same global sequence (with grouping off and
on), corrupt samples are replaced and counted, a shard that does not decompress is one line
naming it, and an object-store outage of a few seconds costs retries, not the run.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import pargo_dist  # noqa: F401
from pargo_dist.data.schema import MDS_COLUMNS, make_sample
from support.ranks import read_rank_results, run_ranks
from support.s3 import OutageProxy

WORKER = Path(__file__).parent / "support" / "data_worker.py"
COLOURS = ["red", "green", "blue", "yellow"]
KINDS = ["square", "circle", "cross"]
WORDS = ["a", "an", "image", "of", "Describe", "the", "in", "detail", "."] + COLOURS + KINDS
N = 48  # divisible by ranks x batch, so an epoch has no padding samples
BATCH = 4
GROUPED = {"group_by_length": True, "group_size": 8, "group_block": 24}  # a step (2 ranks x 4) = a group


def png(i: int) -> bytes:
    img = Image.new("RGB", (16, 16), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def samples(n: int, corrupt: set[int] = frozenset()):
    for i in range(n):
        caption = f"a {COLOURS[i % 4]} {KINDS[i % 3]} ."
        image = b"\x89PNG garbage" if i in corrupt else png(i)
        yield make_sample(f"s{i:03d}", image, caption=caption)


def write_mds(out, rows, size_limit=2048):
    from streaming import MDSWriter

    with MDSWriter(out=out, columns=MDS_COLUMNS, compression="zstd", size_limit=size_limit) as w:
        for row in rows:
            w.write(row)


@pytest.fixture(scope="module")
def remote(s3_server, tmp_path_factory):
    """Raw JSONL + PNG files, converted by `convert` straight into the S3 bucket."""
    from pargo_dist.data.convert import convert

    raw = tmp_path_factory.mktemp("raw")
    with open(raw / "captions.jsonl", "w") as f:
        for i, row in enumerate(samples(N)):
            (raw / f"{row['id']}.png").write_bytes(row["image"])
            caption = " ".join([row["caption"]] * (1 + i * 7 % 4))  # 1-4 phrases: lengths to group by
            f.write(json.dumps({"id": row["id"], "image": f"{row['id']}.png", "caption": caption}) + "\n")
    bucket = s3_server.make_bucket("stream-test")
    remote = f"{bucket}/pretrain"
    summary = convert([str(raw / "captions.jsonl")], remote, size_limit=1024, progress=False,
                      report=str(raw / "report.jsonl"))
    assert (summary.written, summary.skipped) == (N, {}) and summary.shards >= 6  # several shards
    assert {"pretrain/index.json", "pretrain/lengths.npz"} <= set(s3_server.list_keys("stream-test"))
    return remote


def run(tmp_path: Path, name: str, world: int, data: dict, **spec) -> list[dict]:
    out = tmp_path / name
    full = {"words": WORDS, "batch_size": BATCH, "out": str(out),
            "data": {"max_len": 64, "download_retry": 5, "download_timeout": 30, **data}, **spec}
    if world == 1:  # no process group needed: in this process (streaming reads rank 0 of 1)
        from support.data_worker import read

        endpoint = full.get("endpoint")
        saved = os.environ.get("S3_ENDPOINT_URL")
        try:
            if endpoint:
                os.environ["S3_ENDPOINT_URL"] = endpoint
            return [json.loads(json.dumps(read(full)))]  # as the worker's JSON file would give it
        finally:
            if endpoint:
                os.environ.pop("S3_ENDPOINT_URL") if saved is None else os.environ.update(S3_ENDPOINT_URL=saved)
    spec_path = tmp_path / f"{name}.spec.json"
    spec_path.write_text(json.dumps(full))
    run_ranks(WORKER, [str(spec_path)], world)
    return read_rank_results(out, world)


def ids_of(results: list[dict]) -> list[str]:
    return [i for r in results for b in r["batches"] for i in b]


def test_one_rank_epoch_covers_every_sample_once(remote, tmp_path):
    res = run(tmp_path, "one", 1, {"remote": remote, "local": str(tmp_path / "cache")})
    assert Counter(ids_of(res)) == Counter(f"s{i:03d}" for i in range(N))
    assert len(res[0]["batches"]) == N // BATCH


def test_two_ranks_cover_every_sample_once(remote, tmp_path):
    res = run(tmp_path, "two", 2, {"remote": remote, "local": str(tmp_path / "cache")})
    per_rank = [set(i for b in r["batches"] for i in b) for r in res]
    assert not per_rank[0] & per_rank[1]
    assert Counter(ids_of(res)) == Counter(f"s{i:03d}" for i in range(N))


def test_restored_loader_continues_with_identical_batches(remote, tmp_path):
    """Two ranks read an epoch, noting the loader state after k batches; a new pair of ranks
    (new caches) restored from that state reads exactly the batches the first pair read next.
    With length-grouped batches (data.group_by_length): the grouping is part of the order."""
    data = {"remote": remote, "seed": 7, **GROUPED}
    k = 2
    full = run(tmp_path, "full", 2, {**data, "local": str(tmp_path / "c1")}, state_after=k)
    state = tmp_path / "state.json"
    state.write_text(json.dumps(full[0]["state"]))
    assert full[0]["state"]["sample_in_epoch"] == k * BATCH * 2
    rest = run(tmp_path, "rest", 2, {**data, "local": str(tmp_path / "c3")}, state_in=str(state))
    for r in range(2):
        assert len(full[r]["batches"]) == N // (BATCH * 2) > k
        assert rest[r]["batches"] == full[r]["batches"][k:]  # the identical next batches


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "group_by_length"])
def test_elastic_restore_two_ranks_to_one_continues_the_same_sequence(remote, tmp_path, grouped):
    """Two ranks read an epoch, noting the loader state after 3 steps; one rank restored from it
    reads the rest of the same global sequence (no repeats, nothing lost, same order)."""
    data = {"remote": remote, "seed": 11, **(GROUPED if grouped else {})}
    first = run(tmp_path, "first", 2, {**data, "local": str(tmp_path / "c1")}, state_after=3)
    state = tmp_path / "state.json"
    state.write_text(json.dumps(first[0]["state"]))
    assert first[0]["state"]["sample_in_epoch"] == 3 * BATCH * 2
    rest = run(tmp_path, "rest", 1, {**data, "local": str(tmp_path / "c2")}, state_in=str(state))
    # the global sequence: step by step, position b of every rank's micro-batch (streaming strides ranks)
    sequence = [r["batches"][step][b] for step in range(N // (2 * BATCH)) for b in range(BATCH) for r in first]
    assert Counter(sequence) == Counter(f"s{i:03d}" for i in range(N))
    assert ids_of(rest) == sequence[3 * BATCH * 2:]


def test_corrupt_samples_are_replaced_and_counted(tmp_path):
    corrupt = {5, 6, 30}
    local = tmp_path / "mds"
    write_mds(str(local), samples(N, corrupt))
    res = run(tmp_path, "bad", 1, {"local": str(local), "shuffle": False})
    batches = res[0]["batches"]
    assert all(len(b) == BATCH for b in batches)  # batch size never changes
    assert sorted(i for i, _ in res[0]["skipped"]) == ["s005", "s006", "s030"]
    assert {reason for _, reason in res[0]["skipped"]} == {"bad_image"}
    seen = ids_of(res)
    assert not {f"s{i:03d}" for i in corrupt} & set(seen)
    assert seen[5] == seen[6] == "s007"  # replaced by the next usable sample, in order


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # streaming reading garbage sizes
def test_a_damaged_shard_is_skipped_and_counted_or_named_never_a_silent_wait(tmp_path):
    """Bytes of a written shard overwritten, or the shard truncated (a bad copy, a full disk):
    records that no longer decode are replaced and counted like corrupt images, with the shard
    named; a run of them longer than data.max_substitutes is an error naming the shard."""
    from pargo_dist.data.dataset import DataConfig, ParGoDataset
    from pargo_dist.data.image import ImagePreprocessor
    from pargo_dist.data.tokenizer import build_word_tokenizer
    from pargo_dist.errors import UserError

    local = tmp_path / "mds"
    from streaming import MDSWriter

    with MDSWriter(out=str(local), columns=MDS_COLUMNS, size_limit=1024) as w:  # uncompressed: bytes as read
        for row in samples(N):
            w.write(row)
    shards = sorted(local.glob("shard.*.mds"))
    assert len(shards) >= 4
    victim = shards[1]

    def dataset(max_substitutes=32):
        cfg = DataConfig(local=str(local), shuffle=False, max_len=64, max_substitutes=max_substitutes)
        return ParGoDataset(cfg, tokenizer=build_word_tokenizer(WORDS), num_image_tokens=4, batch_size=1,
                            image_processor=ImagePreprocessor(size=16, resize_to=16))

    ds = dataset()
    in_victim = [i for i in range(N) if ds.shard_file(i) == str(victim)]
    assert in_victim and ds.shard_file(0) == str(shards[0])
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64  # inside one record's text and image
    victim.write_bytes(bytes(data))
    ds = dataset()
    skipped = [s for i in range(N) for s in ds[i]["skipped"]]
    assert skipped and all(reason in ("damaged_record", "bad_image") for _, reason in skipped)
    assert any(reason == "damaged_record" and name.startswith(f"{victim}#") for name, reason in skipped)
    assert len(skipped) < len(in_victim)  # only the damaged records, not the whole shard

    victim.write_bytes(bytes(data[: len(data) // 4]))  # truncated: every later record of it is gone
    with pytest.raises(UserError, match=f"consecutive unusable samples .*{victim}"):
        [dataset(max_substitutes=2)[i] for i in range(N)]


@pytest.mark.parametrize("workers", [0, 1], ids=["no_worker", "loader_worker"])
def test_a_shard_that_does_not_decompress_is_one_line_naming_it(tmp_path, workers):
    """A zstd shard truncated on disk (a bad upload or copy) does not decompress at all, so it
    cannot be skipped record by record. Before, that was a traceback of 60 lines (zstd.Error
    during a FileNotFoundError for the decompressed name) or, when streaming's prefetch thread met
    it first, an epoch that ended early without a word. Now the reader raises a DamagedShard that
    names the stream and the file and says what to do, in one line, also out of a loader worker."""
    from pargo_dist.data.dataset import DataConfig, ParGoDataset
    from pargo_dist.data.image import ImagePreprocessor
    from pargo_dist.data.tokenizer import build_word_tokenizer
    from pargo_dist.errors import DamagedShard
    from support.data_worker import read

    local = tmp_path / "mds"
    write_mds(str(local), samples(N), size_limit=1024)  # zstd
    victim = local / "shard.00001.mds.zstd"
    victim.write_bytes(victim.read_bytes()[:100])
    expected = (f"data stream {local}: shard shard.00001.mds.zstd is damaged (it does not decompress: truncated or "
                "overwritten after it was written); re-convert it with `pargo-dist convert` or re-upload it")
    data = {"local": str(local), "shuffle": False, "max_len": 64, "num_workers": workers}
    with pytest.raises(DamagedShard) as caught:  # streaming's prefetch thread meets it first
        read({"words": WORDS, "batch_size": BATCH, "data": data})
    assert str(caught.value) == expected

    cfg = DataConfig(**data)  # no threads: the reader's own get_item meets it
    ds = ParGoDataset(cfg, tokenizer=build_word_tokenizer(WORDS), num_image_tokens=4, batch_size=1,
                      image_processor=ImagePreprocessor(size=16, resize_to=16))
    with pytest.raises(DamagedShard) as caught:
        [ds[i] for i in range(N)]
    assert str(caught.value) == expected


def test_object_store_outage_costs_retries_not_the_run(s3_server, tmp_path):
    bucket = s3_server.make_bucket("outage-test")
    remote = f"{bucket}/pretrain"
    write_mds((str(tmp_path / "stage"), remote), samples(N), size_limit=1024)  # many small shards
    proxy = OutageProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    signal = tmp_path / "outage.signal"

    def cut_when_asked():
        deadline = time.monotonic() + 120
        while not signal.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.outage(3.0)

    threading.Thread(target=cut_when_asked, daemon=True).start()
    res = run(tmp_path, "outage", 1,
              {"remote": remote, "local": str(tmp_path / "cache"), "shuffle": False, "predownload": BATCH},
              endpoint=proxy.endpoint, outage_after=1, outage_signal=str(signal), outage_wait=0.2)
    assert signal.exists()
    assert Counter(ids_of(res)) == Counter(f"s{i:03d}" for i in range(N))
    assert proxy.dropped >= 1  # downloads did hit the outage, and were retried through it
