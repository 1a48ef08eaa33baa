"""`pargo-dist convert`: every input kind -> MDS shards that read back exactly.

Inputs are made here (16-64 px PNG / JPEG); the output is read back with streaming's own MDS
reader (or StreamingDataset from a real S3 server on loopback) and compared byte for byte.
Also: bad samples are skipped, counted and reported without stopping the run; resize; the
same output from 1 or 2 workers; the lengths sidecar beside the index (local and S3); no
index.json that claims shards which are not there (a killed run, a failed upload); refusal
to overwrite.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import pargo_dist  # noqa: F401  (before streaming: torchvision shim)
from pargo_dist.data import convert as convert_mod
from pargo_dist.data.convert import OutputExistsError, convert
from pargo_dist.data.grouping import SIDECAR
from pargo_dist.data.readers import InputNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def image(i: int, fmt: str = "PNG", size: tuple[int, int] = (16, 16)) -> bytes:
    img = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    img.putpixel((i % size[0], 0), (255, 255, 255))  # no two images alike
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_images(root: Path, n: int) -> dict[str, bytes]:
    """n files alternating PNG / JPEG under root/sub/; returns relative path -> bytes."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(n):
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
        rel = f"sub/{i:03d}.{ext}"
        files[rel] = image(i, fmt, (16 + i % 3 * 8, 24))
        (root / rel).write_bytes(files[rel])
    return files


def read_mds(out: Path, scratch: Path) -> list[dict]:
    """All samples of a local MDS dataset, in order, via streaming's MDS reader."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    index = json.loads((out / "index.json").read_text())
    work = scratch / f"read_{out.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    for shard in index["shards"]:
        assert shard["samples"] > 0, "no empty shards"
        zip_info, raw = shard["zip_data"], shard["raw_data"]["basename"]
        data = (out / (zip_info or shard["raw_data"])["basename"]).read_bytes()
        (work / raw).write_bytes(decompress(shard["compression"], data) if zip_info else data)
        reader = reader_from_json(str(work), None, shard)
        rows += [reader.get_item(i) for i in range(shard["samples"])]
    return rows


def read_sidecar(path: str) -> dict[str, list[int]]:
    from pargo_dist.data.grouping import read_sidecar as read

    return {k: v.tolist() for k, v in read(path).items()}


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def report_entries(summary) -> list[dict]:
    return [json.loads(line) for line in Path(summary.report_path).read_text().splitlines()]


# --------------------------------------------------------------------------- input kinds


def test_jsonl_with_image_root_keeps_original_bytes(tmp_path):
    files = write_images(tmp_path / "imgs", 6)
    recs = [{"image": rel, "caption": f"  caption {i}  "} for i, rel in enumerate(files)]
    recs[1] = {"image_path": list(files)[1], "text": "by image_path", "id": "custom-1"}
    recs[2] = {"file_name": str(tmp_path / "imgs" / list(files)[2]), "description": "absolute path"}
    src = jsonl(tmp_path / "caps.jsonl", recs[:3] + [""] + recs[3:])  # a blank line is not a record
    summary = convert([str(src)], str(tmp_path / "out"), image_root=str(tmp_path / "imgs"), progress=False)

    rows = read_mds(tmp_path / "out", tmp_path)
    assert summary.written == 6 and summary.skipped == {} and summary.shards == 1
    assert summary.bytes == sum(f.stat().st_size for f in (tmp_path / "out").glob("shard.*"))
    assert [r["id"] for r in rows] == ["caps.jsonl:1", "custom-1", "caps.jsonl:3", "caps.jsonl:5",
                                       "caps.jsonl:6", "caps.jsonl:7"]
    assert [r["caption"] for r in rows] == ["caption 0", "by image_path", "absolute path",
                                            "caption 3", "caption 4", "caption 5"]
    assert [r["image"] for r in rows] == list(files.values())  # not re-encoded
    assert all(r["messages"] == [] for r in rows)
    assert Path(summary.report_path) == tmp_path / "out" / "convert_report.jsonl"
    assert "written  6 samples in 1 shard(s)" in summary.format()


def test_default_image_root_is_the_input_directory(tmp_path):
    files = write_images(tmp_path, 2)
    src = jsonl(tmp_path / "caps.jsonl", [{"image": rel, "caption": "c"} for rel in files])
    summary = convert([str(src)], str(tmp_path / "out"), progress=False)
    assert summary.written == 2
    assert [r["image"] for r in read_mds(tmp_path / "out", tmp_path)] == list(files.values())


def test_llava_conversations_normalized(tmp_path):
    files = write_images(tmp_path / "coco", 2)
    a, b = list(files)
    items = [
        {"id": "q1", "image": a, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "q2", "image": b, "conversations": [  # no marker: placed in the first human turn
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A square."}]},
        {"id": "t1", "conversations": [  # text-only LLaVA item
            {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(items, indent=1))
    summary = convert([str(src)], str(tmp_path / "out"), image_root=str(tmp_path / "coco"), progress=False)
    rows = read_mds(tmp_path / "out", tmp_path)
    assert summary.written == 3 and [r["id"] for r in rows] == ["q1", "q2", "t1"]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    assert rows[1]["messages"][0] == {"role": "user", "content": "<image>\nDescribe it."}
    assert rows[2]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    assert [r["image"] for r in rows] == [files[a], files[b], b""]
    assert all(r["caption"] == "" for r in rows)
    # beside the index, what data.group_by_length sorts by: text characters, turns, image size
    assert read_sidecar(str(tmp_path / "out" / SIDECAR)) == {
        "text_chars": [sum(len(m["content"]) for m in r["messages"]) for r in rows], "turns": [4, 2, 2],
        "width": [16, 24, 0], "height": [24, 24, 0]}


def test_parquet_raw_bytes_and_hf_image_struct(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = [image(i, "JPEG" if i % 2 else "PNG") for i in range(5)]
    pq.write_table(pa.table({"image_bytes": imgs, "caption": [f"p{i}" for i in range(5)]}),
                   tmp_path / "raw.parquet", row_group_size=2)
    hf = pa.table({"image": [{"bytes": b, "path": None} for b in imgs[:2]], "text": ["h0", "h1"]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    summary = convert([str(tmp_path / "raw.parquet"), str(tmp_path / "hf.parquet")], str(tmp_path / "out"),
                      progress=False)
    rows = read_mds(tmp_path / "out", tmp_path)
    assert summary.written == 7
    assert [r["id"] for r in rows] == [f"raw.parquet:{i}" for i in range(5)] + ["hf.parquet:0", "hf.parquet:1"]
    assert [r["caption"] for r in rows] == ["p0", "p1", "p2", "p3", "p4", "h0", "h1"]
    assert [r["image"] for r in rows] == imgs + imgs[:2]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_txt_and_json(tmp_path):
    imgs = [image(i, "JPEG" if i % 2 else "PNG") for i in range(4)]
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A tile."}]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        add_member(tar, "._000000.jpg", b"macOS resource fork")  # hidden: ignored
        add_member(tar, "000000.png", imgs[0])
        add_member(tar, "000000.txt", "a txt caption".encode())
        add_member(tar, "000001.jpg", imgs[1])
        add_member(tar, "000001.json", json.dumps({"caption": "a json caption", "url": "x"}).encode())
        add_member(tar, "000002.png", imgs[2])
        add_member(tar, "000002.json", json.dumps({"id": "conv-2", "conversations": conv}).encode())
        add_member(tar, "000003.jpg", imgs[3][: len(imgs[3]) // 2])  # truncated JPEG: skipped
        add_member(tar, "000003.txt", b"never written")
        add_member(tar, "000004.txt", b"caption without image")
    summary = convert([str(tmp_path / "shard-000.tar")], str(tmp_path / "out"), progress=False)
    rows = read_mds(tmp_path / "out", tmp_path)
    assert [r["id"] for r in rows] == ["shard-000.tar:000000", "shard-000.tar:000001", "conv-2"]
    assert [r["caption"] for r in rows] == ["a txt caption", "a json caption", ""]
    assert rows[2]["messages"] == [{"role": "user", "content": "<image>\nWhat is it?"},
                                   {"role": "assistant", "content": "A tile."}]
    assert [r["image"] for r in rows] == imgs[:3]
    assert summary.skipped == {"bad_image": 1, "missing_image": 1}
    assert [(e["id"], e["reason"]) for e in report_entries(summary)] == [
        ("shard-000.tar:000003", "bad_image"), ("shard-000.tar:000004", "missing_image")]

    # A tar cut off mid-member (a partial download): what precedes the cut is converted, the
    # rest is one "truncated_input" entry, and the run goes on.
    whole = (tmp_path / "shard-000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: 512 * 8 + 100])  # inside the 3rd member's data
    summary = convert([str(tmp_path / "cut.tar")], str(tmp_path / "out_cut"), progress=False)
    assert summary.written == 1 and summary.skipped == {"truncated_input": 1}
    assert read_mds(tmp_path / "out_cut", tmp_path)[0]["image"] == imgs[0]


# --------------------------------------------------------------------------- bad input


def test_bad_samples_skipped_counted_and_reported(tmp_path):
    files = write_images(tmp_path / "imgs", 4)
    rels = list(files)
    jpeg = files[rels[1]]
    (tmp_path / "imgs" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    caps = jsonl(tmp_path / "caps.jsonl", [
        {"image": rels[0], "caption": "good 0"},
        {"image": "sub/nope.png", "caption": "missing file"},
        {"image": "truncated.jpg", "caption": "truncated jpeg"},
        {"image_base64": base64.b64encode(os.urandom(64)).decode(), "caption": "random bytes"},
        {"image_base64": "%%% not base64", "caption": "bad base64"},
        {"image": rels[1], "caption": "   "},
        '{"image": "sub/000.png", "caption": ',  # malformed JSON line
        "[1, 2]",
        {"image": rels[2], "caption": "two <image> markers"},
        {"caption": "no image field"},
        {"image_base64": base64.b64encode(files[rels[3]]).decode(), "caption": "good base64"},
    ])
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([
        {"id": "ok", "image": rels[2], "conversations": [
            {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},
        {"id": "no-gpt", "image": rels[2], "conversations": [{"from": "human", "value": "<image>\nQ?"}]},
        {"id": "marker-no-image", "conversations": [
            {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},
        {"id": "bad-role", "image": rels[2], "conversations": [
            {"from": "robot", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
    ]))
    summary = convert([str(caps), str(llava)], str(tmp_path / "out"), image_root=str(tmp_path / "imgs"),
                      progress=False)

    rows = read_mds(tmp_path / "out", tmp_path)
    assert [r["id"] for r in rows] == ["caps.jsonl:1", "caps.jsonl:11", "ok"]
    assert rows[1]["image"] == files[rels[3]]
    expected = {  # id -> reason
        "caps.jsonl:2": "missing_image", "caps.jsonl:3": "bad_image", "caps.jsonl:4": "bad_image",
        "caps.jsonl:5": "bad_image", "caps.jsonl:6": "empty_text", "caps.jsonl:7": "malformed_json",
        "caps.jsonl:8": "malformed", "caps.jsonl:9": "marker_in_caption", "caps.jsonl:10": "no_image",
        "no-gpt": "no_answer", "marker-no-image": "marker_without_image", "bad-role": "malformed_conversation",
    }
    entries = report_entries(summary)
    assert {e["id"]: e["reason"] for e in entries} == expected
    assert summary.skipped == dict(Counter(expected.values()))
    assert summary.written + sum(summary.skipped.values()) == 11 + 4 == summary.total
    by_id = {e["id"]: e for e in entries}
    assert by_id["caps.jsonl:7"]["line"] == 7 and by_id["caps.jsonl:7"]["source"] == str(caps)
    assert by_id["no-gpt"]["line"] == 1 and by_id["no-gpt"]["source"] == str(llava)
    assert "nope.png" in by_id["caps.jsonl:2"]["detail"]
    text = summary.format()
    assert "skipped  12 (bad_image 3," in text and str(summary.report_path) in text


# --------------------------------------------------------------------------- options


def test_max_side_resizes_only_larger_images(tmp_path):
    big_jpeg, big_png, small = image(1, "JPEG", (64, 32)), image(2, "PNG", (20, 48)), image(3, "JPEG", (24, 24))
    src = tmp_path / "caps.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_bytes": [big_jpeg, big_png, small], "caption": ["a", "b", "c"]}), src)
    summary = convert([str(src)], str(tmp_path / "out"), max_side=24, progress=False)
    rows = read_mds(tmp_path / "out", tmp_path)
    assert summary.written == 3
    got = [Image.open(io.BytesIO(r["image"])) for r in rows]
    assert [(g.format, g.size) for g in got] == [("JPEG", (24, 12)), ("PNG", (10, 24)), ("JPEG", (24, 24))]
    assert rows[2]["image"] == small  # not larger: original bytes


def test_two_workers_same_output_as_one(tmp_path):
    files = write_images(tmp_path / "imgs", 10)
    recs = [{"image": rel, "caption": f"c{i}"} for i, rel in enumerate(files)] * 5  # 50: several batches
    recs[7] = {"image": "sub/missing.png", "caption": "x"}
    inputs = [str(jsonl(tmp_path / "a.jsonl", recs)), str(jsonl(tmp_path / "b.jsonl", recs[:9]))]
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        summary = convert(inputs, str(out), image_root=str(tmp_path / "imgs"), workers=workers,
                          size_limit=2048, progress=False)
        assert (summary.written, summary.skipped) == (57, {"missing_image": 2})
        outs.append(out)
    assert sorted(p.name for p in outs[0].iterdir()) == sorted(p.name for p in outs[1].iterdir())
    for shard in outs[0].glob("shard.*"):
        assert shard.read_bytes() == (outs[1] / shard.name).read_bytes()
    rows = read_mds(outs[1], tmp_path)
    assert len(rows) == 57 and rows[7]["id"] == "a.jsonl:9" and rows[-1]["id"] == "b.jsonl:9"
    assert len(json.loads((outs[1] / "index.json").read_text())["shards"]) > 1


def test_dead_worker_fails_the_run_instead_of_hanging(tmp_path, monkeypatch):
    """A worker killed mid-task (say by the OOM killer) raises in the parent; nothing is left."""
    files = write_images(tmp_path, 2)
    src = jsonl(tmp_path / "caps.jsonl", [{"image": list(files)[i % 2], "caption": "c"} for i in range(40)])
    real = convert_mod.process_record

    def die_on_line_30(rec, max_side):  # runs in the forked worker
        if rec.line == 30:
            os._exit(1)
        return real(rec, max_side)

    monkeypatch.setattr(convert_mod, "process_record", die_on_line_30)
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        convert([str(src)], str(tmp_path / "out"), workers=2, size_limit=512, progress=False)
    assert not (tmp_path / "out").exists()


def test_sample_larger_than_shard_limit_gets_its_own_shard(tmp_path):
    files = write_images(tmp_path, 3)
    src = jsonl(tmp_path / "caps.jsonl", [{"image": rel, "caption": "c"} for rel in files])
    summary = convert([str(src)], str(tmp_path / "out"), size_limit=64, compression=None, progress=False)
    assert summary.shards == 3 and summary.written == 3
    assert [r["image"] for r in read_mds(tmp_path / "out", tmp_path)] == list(files.values())


def test_cli_arguments_and_run(tmp_path, capsys):
    files = write_images(tmp_path, 2)
    src = jsonl(tmp_path / "caps.jsonl", [{"image": rel, "caption": "c"} for rel in files])
    parser = argparse.ArgumentParser()
    convert_mod.add_arguments(parser)
    args = parser.parse_args([str(src), "--out", str(tmp_path / "out"), "--compression", "none",
                              "--size-limit", "1kb", "--no-progress", "--workers", "1"])
    assert convert_mod.run(args) == 0
    assert "written  2 samples" in capsys.readouterr().out
    assert list((tmp_path / "out").glob("shard.*.mds")) != []
    args = parser.parse_args([str(src), "--out", str(tmp_path / "out2"), "--image-root", str(tmp_path / "x"),
                              "--no-progress"])
    (tmp_path / "x").mkdir()
    assert convert_mod.run(args) == 1  # nothing could be written: a pipeline should stop
    assert "missing_image 2" in capsys.readouterr().out


# --------------------------------------------------------------------------- refusals


def test_refuses_existing_dataset_and_missing_input(tmp_path):
    files = write_images(tmp_path, 1)
    src = jsonl(tmp_path / "caps.jsonl", [{"image": rel, "caption": "c"} for rel in files])
    convert([str(src)], str(tmp_path / "out"), progress=False)
    with pytest.raises(OutputExistsError, match=str(tmp_path / "out" / "index.json")):
        convert([str(src)], str(tmp_path / "out"), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shard.00000.mds").write_bytes(b"left over")
    with pytest.raises(OutputExistsError, match="not empty"):
        convert([str(src)], str(tmp_path / "other"), progress=False)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputNotFoundError, match=str(missing)):
        convert([str(src), str(missing)], str(tmp_path / "out3"), progress=False)
    assert not (tmp_path / "out3").exists()  # inputs are checked before anything is written
    bad = tmp_path / "broken.json"
    bad.write_text('[{"image": "a.png", "caption": "x"},')
    with pytest.raises(ValueError, match=str(bad)):
        convert([str(bad)], str(tmp_path / "out4"), progress=False)
    assert not (tmp_path / "out4").exists()  # a failed run leaves nothing behind


# --------------------------------------------------------------------------- interruption


KILLED_RUN = """
import sys
import pargo_dist
from pargo_dist.data.convert import convert
convert([sys.argv[1]], sys.argv[2], image_root=sys.argv[3], size_limit=1024, progress=False)
"""


def test_killed_conversion_leaves_no_index(tmp_path):
    """A conversion reading from a FIFO is SIGKILLed after it has flushed shards: MDSWriter
    writes index.json only in finish(), so the directory has shards and no index."""
    files = write_images(tmp_path / "imgs", 4)
    fifo = tmp_path / "caps.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(fifo), str(out), str(tmp_path / "imgs")],
                            cwd=ROOT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while True:  # non-blocking open: a converter that died before reading must not hang us
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert proc.poll() is None, "the converter exited before opening its input"
                assert time.monotonic() < deadline, "the converter never opened its input"
                time.sleep(0.05)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "w") as feed:
            for i in range(40):  # far less than a pipe buffer: never blocks
                feed.write(json.dumps({"image": list(files)[i % 4], "caption": f"c{i}"}) + "\n")
            feed.flush()
            while not (out / "shard.00002.mds.zstd").exists():
                assert proc.poll() is None, "the converter exited early"
                assert time.monotonic() < deadline, "no shards flushed"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert list(out.glob("shard.*")) and not (out / "index.json").exists()


def test_interrupted_run_cleans_up_its_shards(tmp_path, monkeypatch):
    """Ctrl-C (or any exception) mid-run: no index, and the shards it wrote are removed, so
    the same --out works on the rerun."""
    files = write_images(tmp_path, 2)
    src = jsonl(tmp_path / "caps.jsonl", [{"image": list(files)[i % 2], "caption": f"c{i}"} for i in range(30)])
    real = convert_mod.process_record
    seen = []

    def interrupt_late(rec, max_side):
        seen.append(rec.line)
        if len(seen) == 25:
            raise KeyboardInterrupt
        return real(rec, max_side)

    monkeypatch.setattr(convert_mod, "process_record", interrupt_late)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert([str(src)], str(out), size_limit=512, progress=False)
    assert not out.exists()
    monkeypatch.setattr(convert_mod, "process_record", real)
    assert convert([str(src)], str(out), size_limit=512, progress=False).written == 30


# --------------------------------------------------------------------------- S3


def test_convert_straight_to_s3(s3_server, tmp_path):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    bucket = s3_server.make_bucket("convert-test")
    files = write_images(tmp_path / "imgs", 6)
    src = jsonl(tmp_path / "caps.jsonl", [{"image": rel, "caption": f"c{i}"} for i, rel in enumerate(files)])
    remote = f"{bucket}/pretrain"
    summary = convert([str(src)], remote, image_root=str(tmp_path / "imgs"), size_limit=1024,
                      report=str(tmp_path / "report.jsonl"), progress=False)
    assert summary.written == 6 and summary.shards > 1 and summary.out == remote
    keys = s3_server.list_keys("convert-test", "pretrain/")
    assert {"pretrain/index.json", f"pretrain/{SIDECAR}"} <= set(keys)
    assert sorted(k for k in keys if k not in ("pretrain/index.json", f"pretrain/{SIDECAR}")) == [
        f"pretrain/shard.{i:05d}.mds.zstd" for i in range(summary.shards)]
    s3_server.client().download_file("convert-test", f"pretrain/{SIDECAR}", str(tmp_path / SIDECAR))
    assert read_sidecar(str(tmp_path / SIDECAR)) == {"text_chars": [2] * 6, "turns": [0] * 6,
                                                     "width": [16, 24, 32] * 2, "height": [24] * 6}

    clean_stale_shared_memory()
    ds = StreamingDataset(remote=remote, local=str(tmp_path / "cache"), batch_size=1, shuffle=False)
    got = [ds[i] for i in range(len(ds))]
    assert [s["id"] for s in got] == [f"caps.jsonl:{i}" for i in range(1, 7)]
    assert [s["image"] for s in got] == list(files.values())

    with pytest.raises(OutputExistsError, match="convert-test/pretrain/index.json"):
        convert([str(src)], remote, image_root=str(tmp_path / "imgs"), report=str(tmp_path / "r2.jsonl"),
                progress=False)


def test_failed_upload_writes_no_remote_index(s3_server, tmp_path, monkeypatch):
    """The last shard's upload is slow and then fails. Stock MDSWriter would upload index.json
    meanwhile (its upload queue is empty); here no index may reach the bucket."""
    from streaming.base.storage.upload import S3Uploader

    bucket = s3_server.make_bucket("convert-fail")
    files = write_images(tmp_path / "imgs", 4)
    src = jsonl(tmp_path / "caps.jsonl", [{"image": rel, "caption": "c"} for rel in files])
    real_upload = S3Uploader.upload_file

    def flaky(self, filename):
        if filename.startswith("shard.00003"):
            time.sleep(0.5)
            raise ConnectionError("simulated outage")
        return real_upload(self, filename)

    monkeypatch.setattr(S3Uploader, "upload_file", flaky)
    with pytest.raises(convert_mod.UploadError):
        convert([str(src)], f"{bucket}/sft", image_root=str(tmp_path / "imgs"), size_limit=64,
                report=str(tmp_path / "report.jsonl"), progress=False)
    keys = s3_server.list_keys("convert-fail", "sft/")
    assert "sft/index.json" not in keys and "sft/shard.00000.mds.zstd" in keys
