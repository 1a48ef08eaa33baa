"""data.group_by_length: micro-batches of similar length, in an order that resumes exactly.

In-process, on a few hundred tiny samples of mixed lengths (captions of three lengths, images of
two sizes, text-only conversations): the grouped order is a deterministic permutation within
each block; it is the same for any number of nodes, ranks and workers (streaming's own layout
over fake worlds), also when resumed mid-epoch on another world; measured padding waste falls
by more than half; 2 workers give the same batches, and a mixture is grouped over all its
streams; the loader state records the
grouping and a resume with other settings says what it costs. The sidecar comes from the writer
(convert, synth) or from `python -m pargo_dist.data.grouping` for old shards; without it the
dataset refuses with the command to run. Resume over real ranks: tests/test_streaming.py runs
its resume tests with grouping on.
"""

from __future__ import annotations

import io
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import pargo_dist  # noqa: F401  (before streaming: torchvision shim)
from pargo_dist.data.crops import CropPolicy
from pargo_dist.data.dataset import DataConfig, ParGoDataset, StreamConfig, build_loader
from pargo_dist.data.grouping import SIDECAR, add_lengths, group_positions, read_sidecar, sample_sizes
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.data.schema import MDS_COLUMNS, make_sample
from pargo_dist.data.tokenizer import build_word_tokenizer
from pargo_dist.errors import UserError

WORDS = ["a", "red", "blue", "square", "circle", "."]
N = 256
GROUPED = {"group_by_length": True, "group_size": 16, "group_block": 64}
ONE_VIEW = CropPolicy()


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + 8 * (i % 2), 8), (i % 256, 3, 7)).save(buf, format="PNG")
    return buf.getvalue()


def rows(n: int, prefix: str = "s", seed: int = 0):
    """Captions of 2, 10 or 30 phrases with an image (8x8 or 16x8); every 4th a text-only chat."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        text = " ".join(["a red square ."] * int(rng.choice([2, 10, 30])))
        if i % 4 == 3:
            yield make_sample(f"{prefix}{i}", None, messages=[{"role": "user", "content": "a blue circle ."},
                                                               {"role": "assistant", "content": text}])
        else:
            yield make_sample(f"{prefix}{i}", png(i), caption=text)


def write(out, samples, **kw):
    from pargo_dist.data.convert import write_dataset

    write_dataset(((s, None) for s in samples), str(out), size_limit=4096, progress=False, **kw)
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write(tmp_path_factory.mktemp("grouping") / "mixed", rows(N))


def pre(crops: CropPolicy = ONE_VIEW) -> ImagePreprocessor:
    return ImagePreprocessor(size=8, resize_to=None, crops=crops)


def dataset(cfg: DataConfig, batch_size: int = 4, crops: CropPolicy = ONE_VIEW, tokens=16) -> ParGoDataset:
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    return ParGoDataset(cfg, tokenizer=build_word_tokenizer(WORDS), image_processor=pre(crops),
                        num_image_tokens=tokens, batch_size=batch_size)


def read_epoch(cfg: DataConfig, batch_size: int = 8):
    """(sample ids per batch, pad tokens / all tokens) of one epoch on one rank."""
    loader = build_loader(cfg, tokenizer=build_word_tokenizer(WORDS), image_processor=pre(), num_image_tokens=16,
                          batch_size=batch_size)
    batches, pad, total = [], 0, 0
    for b in loader:
        batches.append(b.sample_ids)
        pad, total = pad + b.input_ids.numel() - b.num_tokens, total + b.input_ids.numel()
    return batches, pad / total


def consumption_order(work: np.ndarray) -> list[int]:
    """streaming's (nodes, ranks, workers, batches, batch) partition -> the global order it
    consumes: step s = batch * workers + worker takes from every rank its next micro-batch, and
    position q of a rank's sequence is global position q * ranks + rank (rank = r * nodes + node)."""
    P, R, W, _, B = work.shape
    n, r, w, k, b = np.indices(work.shape).reshape(5, -1)
    flat = np.full(work.size, -1)
    flat[((k * W + w) * B + b) * R * P + r * P + n] = work.reshape(-1)
    return flat[flat != -1].tolist()


# --------------------------------------------------------------------------- the permutation


def test_permutation_is_deterministic_and_stays_within_each_block():
    lengths = np.random.default_rng(1).integers(10, 500, 1000)
    kw = {"num_canonical_nodes": 2, "block": 128, "group": 16, "seed": 5}
    perm = group_positions(lengths, epoch=0, **kw)
    assert np.array_equal(perm, group_positions(lengths, epoch=0, **kw))  # deterministic
    assert not np.array_equal(perm, group_positions(lengths, epoch=1, **kw))  # a new group order each epoch
    assert sorted(perm) == list(range(1000))
    # per canonical node (500 positions each): blocks of 64, groups of 8, consumed in order
    for lo in (0, 500):
        for start in range(lo, lo + 500, 64):
            stop = min(start + 64, lo + 500)
            block = perm[start:stop]
            assert sorted(block) == list(range(start, stop))  # a permutation within the block
            groups = [lengths[block[i:i + 8]] for i in range(0, len(block), 8)]
            assert all((np.diff(g) >= 0).all() for g in groups)  # each group sorted
            if len(block) == 64:  # the 8 groups are the block's 8 length octiles, in shuffled order
                assert sorted(g.max() for g in groups) == sorted(np.sort(lengths[start:stop]).reshape(8, 8).max(1))
    # both canonical nodes put the same octile at the same step (their group orders are one)
    rank = np.argsort(np.argsort(lengths[perm[:64]])) // 8, np.argsort(np.argsort(lengths[perm[500:564]])) // 8
    assert (rank[0][::8] == rank[1][::8]).all()


def test_grouped_order_is_the_same_for_any_world_and_resumes_on_another(data):
    """streaming's own partition of the grouped epoch over 1x1x1, 1x2x2 and 2x2x1 (nodes x ranks x
    workers) and 2x1x3 gives one global order; a resume at sample 32 on another world continues it."""
    from streaming.base.batching import generate_work
    from streaming.base.world import World

    ds = dataset(DataConfig(local=data, max_len=256, num_canonical_nodes=2, seed=3, **GROUPED))
    ds.shuffle_block_size = 1 << 18  # what streaming sets on the first __iter__

    def order(nodes, ranks, workers, epoch=0, resume=0):
        return consumption_order(generate_work("random", ds, World(nodes, ranks, workers, 0), epoch, resume))

    full = order(1, 1, 1)
    assert len(full) == N and sorted(full) == list(range(N))
    for world in ((1, 2, 2), (2, 2, 1), (2, 1, 3)):
        assert order(*world) == full, world
    assert order(2, 2, 1, resume=32) == full[32:]
    assert order(1, 1, 1, epoch=1) != full  # epochs differ

    lengths = ds.sample_lengths
    ds.sample_lengths = None  # grouping off: streaming's plain order over the same samples
    plain = order(1, 1, 1)
    assert Counter(plain) == Counter(full) and plain != full

    def spread(o):  # mean range of estimated lengths within a step of 16 (8 per canonical node)
        return np.mean([np.ptp(lengths[o[s:s + 16]]) for s in range(0, N, 16)])

    assert spread(full) < 0.5 * spread(plain), (spread(full), spread(plain))  # measured: 37 vs 119


def test_grouping_halves_padding_waste_and_workers_give_the_same_batches(data):
    base = {"local": data, "max_len": 256, "seed": 3}
    plain, waste_plain = read_epoch(DataConfig(**base))
    grouped, waste_grouped = read_epoch(DataConfig(**base, **GROUPED))
    assert Counter(i for b in grouped for i in b) == Counter(i for b in plain for i in b) == Counter(
        f"s{i}" for i in range(N))
    assert waste_grouped < 0.5 * waste_plain, (waste_grouped, waste_plain)  # measured: 0.08 vs 0.44
    with_workers, _ = read_epoch(DataConfig(**base, **GROUPED, num_workers=2))  # the dataset goes to workers
    assert with_workers == grouped


def test_loader_state_records_the_grouping_and_a_resume_with_other_settings_says_so(data, caplog):
    def loader(**grouping):
        return build_loader(DataConfig(local=data, max_len=256, seed=3, **grouping),
                            tokenizer=build_word_tokenizer(WORDS), image_processor=pre(), num_image_tokens=16,
                            batch_size=8)

    grouped = loader(**GROUPED)
    it = iter(grouped)
    next(it), next(it)
    state = grouped.state_dict()
    assert state["group_by_length"] == [64, 16] and state["sample_in_epoch"] == 16
    del it, grouped
    loader(**GROUPED).load_state_dict(state)
    assert "loader state was saved with" not in caplog.text
    loader().load_state_dict(state)  # switching grouping off (or on) mid-run: allowed, and said
    assert ("resuming with data.group_by_length off, but the loader state was saved with group_block 64, "
            "group_size 16: the rest of epoch 0 follows the new order") in caplog.text


def test_mixture_is_grouped_over_all_streams(data, tmp_path):
    text = write(tmp_path / "text", rows(64, prefix="x", seed=9))
    streams = [StreamConfig(local=data), StreamConfig(local=text, repeat=2)]  # resampled: text samples twice an epoch
    mix = {"max_len": 256, "seed": 3}
    plain, waste_plain = read_epoch(DataConfig(streams=streams, **mix))
    grouped, waste_grouped = read_epoch(DataConfig(streams=streams, **mix, **GROUPED))
    assert len(grouped) == (N + 128) // 8
    assert Counter(i for b in grouped for i in b) == Counter(i for b in plain for i in b)
    assert waste_grouped < 0.5 * waste_plain


# --------------------------------------------------------------------------- the sidecar


def test_writers_record_text_and_image_sizes(data, tmp_path):
    from pargo_dist.data.synthetic import SyntheticConfig, synthetic_samples, write_splits

    sizes = read_sidecar(f"{data}/{SIDECAR}")
    samples = list(rows(N))
    assert sizes["text_chars"].tolist() == [len(s["caption"]) + sum(len(m["content"]) for m in s["messages"])
                                            for s in samples]
    assert sizes["turns"].tolist() == [len(s["messages"]) for s in samples]  # 0: a caption
    assert sizes["width"].tolist() == [0 if i % 4 == 3 else 8 + 8 * (i % 2) for i in range(N)]
    assert sizes["height"].tolist() == [0 if i % 4 == 3 else 8 for i in range(N)]

    cfg = SyntheticConfig(num_samples=6, image_size=48)
    write_splits(str(tmp_path / "synth"), cfg, held_out_samples=2, kind="mixed", progress=False)
    for split, n in (("train", 6), ("val", 2)):
        syn = read_sidecar(str(tmp_path / "synth" / split / SIDECAR))
        assert syn["width"].tolist() == syn["height"].tolist() == [48] * n
    expected = [len(s["caption"]) + sum(len(m["content"]) for m in s["messages"])
                for s in synthetic_samples(cfg, kind="mixed")]
    assert read_sidecar(str(tmp_path / "synth" / "train" / SIDECAR))["text_chars"].tolist() == expected


@pytest.mark.parametrize("crops", ["single", "dynamic"])
def test_estimated_lengths_follow_the_encoded_ones(data, crops):
    """The estimate (visual tokens by crops + characters / 4 + turns) follows the real token
    counts: images apart from text-only samples, long texts after short ones, and with tiles
    by aspect ratio (16x8: 2 tiles + thumbnail, 8x8: one view) the crops' visual tokens."""
    policy = CropPolicy("dynamic", max_tiles=2) if crops == "dynamic" else CropPolicy()
    ds = dataset(DataConfig(local=data, max_len=512, **GROUPED), crops=policy, tokens={1: 16, 3: 48})
    real = np.array([len(ds.encode(ds.get_item(i))["input_ids"]) for i in range(N)])
    est = ds.sample_lengths
    assert np.corrcoef(est, real)[0, 1] > 0.95
    assert (np.abs(est - real) <= 0.35 * real + 8).all()
    assert ds.image_processor.crop_count(16, 8) == (3 if crops == "dynamic" else 1)  # odd samples' images
    del ds


def test_missing_or_foreign_sidecar_or_bad_knobs_are_refused_with_the_fix(data, tmp_path):
    from streaming import MDSWriter

    old = tmp_path / "old"
    with MDSWriter(out=str(old), columns=MDS_COLUMNS, size_limit=4096) as w:  # shards from before the sidecar
        for row in rows(40):
            w.write(row)
    with pytest.raises(UserError, match=rf"needs {SIDECAR} next to {old}/index.json.*pargo-dist convert.*"
                                        rf"python -m pargo_dist.data.grouping {old}"):
        dataset(DataConfig(local=str(old), **GROUPED))
    dataset(DataConfig(local=str(old)))  # without grouping the sidecar is not needed

    assert add_lengths(str(old)) == f"{old}/{SIDECAR}"  # the cheap fix for old shards: reads them once
    for name, col in read_sidecar(f"{old}/{SIDECAR}").items():
        assert col.tolist() == read_sidecar(f"{data}/{SIDECAR}")[name][:40].tolist(), name
    dataset(DataConfig(local=str(old), **GROUPED))

    shutil.copy(f"{data}/{SIDECAR}", old / SIDECAR)  # another dataset's
    with pytest.raises(UserError, match=f"{SIDECAR} lists {N} samples but its index.json 40"):
        dataset(DataConfig(local=str(old), **GROUPED))
    with pytest.raises(UserError, match="group_block .* must be a multiple of data.group_size"):
        dataset(DataConfig(local=data, group_by_length=True, group_size=16, group_block=40))


def test_missing_sidecar_in_object_storage_is_refused(s3_server, tmp_path):
    from streaming import MDSWriter

    remote = s3_server.make_bucket("grouping-test") + "/old"
    with MDSWriter(out=(str(tmp_path / "stage"), remote), columns=MDS_COLUMNS, size_limit=4096) as w:
        for row in rows(8):
            w.write(row)
    with pytest.raises(UserError, match=f"needs {remote}/{SIDECAR}.*python -m pargo_dist.data.grouping {remote}"):
        dataset(DataConfig(remote=remote, local=str(tmp_path / "cache"), **GROUPED))
    assert add_lengths(remote) == f"{remote}/{SIDECAR}"
    ds = dataset(DataConfig(remote=remote, local=str(tmp_path / "cache2"), **GROUPED))
    assert len(ds.sample_lengths) == 8
    del ds


def test_an_image_that_does_not_decode_is_sized_as_none_and_does_not_stop_the_writer():
    """convert writes corrupt samples too (the loader skips and counts them): their sizes must not raise."""
    buf = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buf, format="PNG")
    assert sample_sizes(make_sample("ok", buf.getvalue(), caption="a cat")) == (5, 0, 30, 20)
    assert sample_sizes(make_sample("bad", b"not an image at all", caption="a cat")) == (5, 0, 0, 0)
