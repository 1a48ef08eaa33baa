"""One rank of a streaming test: read batches, optionally resume from / save a loader state.

Run as `python tests/support/data_worker.py SPEC.json` with RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (real processes, gloo). Writes
`<out>.rank<R>.json` with the sample ids of every batch it read and, on rank 0, the loader
state after `take` batches. One rank needs no process: tests call `read` in-process.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch.distributed as dist

import pargo_dist  # noqa: F401
from pargo_dist.data.dataset import DataConfig, build_loader
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.data.tokenizer import build_word_tokenizer


def read(spec: dict, rank: int = 0) -> dict:
    """Read batches as the spec says; what this rank saw (tests call it in-process for one rank)."""
    tok = build_word_tokenizer(spec["words"])
    cfg = DataConfig(**spec["data"])
    loader = build_loader(cfg, tokenizer=tok, image_processor=ImagePreprocessor(size=16, resize_to=16),
                          num_image_tokens=4, batch_size=spec["batch_size"])
    if spec.get("state_in"):
        loader.load_state_dict(json.load(open(spec["state_in"])))
    batches, skipped, state, t0 = [], [], None, time.monotonic()
    for i, batch in enumerate(loader):
        batches.append(batch.sample_ids)
        skipped += batch.skipped
        assert batch.input_ids.shape[0] == spec["batch_size"] or cfg.pack
        if spec.get("outage_after") == i + 1 and rank == 0:
            with open(spec["outage_signal"], "w") as f:
                f.write("go")
            time.sleep(spec.get("outage_wait", 1.0))
        if spec.get("state_after") == i + 1:  # the loader state here, reading on
            state = loader.state_dict()
        if spec.get("take") and i + 1 == spec["take"]:
            state = loader.state_dict()
            break
    return {"rank": rank, "batches": batches, "skipped": skipped, "state": state, "seconds": time.monotonic() - t0}


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    if spec.get("endpoint"):
        os.environ["S3_ENDPOINT_URL"] = spec["endpoint"]
    result = read(spec, rank)
    with open(f"{spec['out']}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
