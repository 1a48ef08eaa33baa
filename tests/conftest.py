"""Shared tiny model settings: hidden 32-64, 1-2 layers, so the suite stays fast on 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import pargo_dist  # noqa: E402,F401  (environment shims before any transformers import)

torch.set_num_threads(1)

# Every process the suite starts imports tests/support/inject/sitecustomize.py: the fault knobs and
# the fork server's routing of the product's own children (each acts only when its variable is set).
INJECT = str(Path(__file__).parent / "support" / "inject")
_WITHOUT_INJECT = os.environ.get("PYTHONPATH", "")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [INJECT, _WITHOUT_INJECT]))


def _start_fork_server():
    """Processes the tests start (ranks, `pargo-dist` commands, workers) are forked by a server
    that imported torch, transformers, DeepSpeed, megatron-core and streaming once, instead of
    each importing them for 6-8 s (tests/support/forkserver.py; tests/test_forkserver.py checks
    that a forked process equals a fresh one). It starts importing now, while pytest collects
    and runs the in-process tests. PARGO_TEST_FORKSERVER=0 runs every process fresh."""
    import atexit
    import shutil
    import tempfile

    from support import forkserver

    if os.environ.get("PARGO_TEST_FORKSERVER", "1") == "0" or os.environ.get(forkserver.ENV):
        return
    where = tempfile.mkdtemp(prefix="pargo-fs-")
    path = os.path.join(where, "server.sock")
    log = os.environ.get("PARGO_TEST_FORKSERVER_LOG") or os.path.join(where, "server.log")  # says what ran fresh
    # the server itself starts without sitecustomize: each child imports it as a fresh process
    # would, with the child's own environment (its RANK, its knobs)
    server = forkserver.start(path, env={**os.environ, "PYTHONPATH": _WITHOUT_INJECT}, log=open(log, "w"))
    os.environ[forkserver.ENV] = path

    def stop():
        server.terminate()
        try:
            server.wait(timeout=10)
        except Exception:
            server.kill()
        shutil.rmtree(where, ignore_errors=True)

    atexit.register(stop)


_start_fork_server()

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1

TINY_VISION = {
    "clip": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,  # 4 x 4 patch grid
    },
    "siglip": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    },
}

TINY_TEXT = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
    },
    # Learned absolute positions (unlike RoPE, whose outputs ignore a common shift): shows that
    # left padding gets the right position ids.
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 48,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": VOCAB,
        "n_positions": 256,
    },
}

TINY_PROJECTOR = {"num_partial": 8, "num_global": 2, "depth": 2, "width": 32, "heads": 4, "ffn": 64}


def tiny_config(text: str = "llama", vision: str = "clip", **overrides):
    from pargo_dist.models import ParGoConfig

    values = dict(
        vision_config=dict(TINY_VISION[vision]),
        text_config=dict(TINY_TEXT[text]),
        projector=dict(TINY_PROJECTOR),
        image_token_id=IMAGE_TOKEN,
    )
    values.update(overrides)
    return ParGoConfig(**values)


def tiny_model(text: str = "llama", vision: str = "clip", seed: int = 0, **overrides):
    from pargo_dist.models import ParGoForConditionalGeneration

    torch.manual_seed(seed)
    return ParGoForConditionalGeneration(tiny_config(text, vision, **overrides)).eval()


@pytest.fixture(params=["llama", "qwen2"])
def text_type(request):
    return request.param


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback for the whole session; S3 env vars point at it."""
    from support.s3 import start_moto

    server = start_moto()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The synthetic dataset of support/training.TEST_RECIPE: generated by the first run (rank 0)."""
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir):
    """Uninterrupted 2-rank runs of TEST_RECIPE, one per (zero stage, stage), shared by every
    test that compares a loss curve against one (test_train, test_slurm)."""
    from support.training import run_train, write_recipe

    cache = {}

    def get(zero: int, stage: str) -> Path:
        if (zero, stage) not in cache:
            tmp = tmp_path_factory.mktemp(f"ref_z{zero}_{stage}")
            rec = write_recipe(tmp / "recipe.yaml", tmp / "run", data_dir)
            run_train(rec, [f"backend.zero_stage={zero}", f"train.stage={stage}"], nproc=2)
            cache[(zero, stage)] = tmp / "run"
        return cache[(zero, stage)]

    return get


def pytest_addoption(parser):
    parser.addoption("--group", default=None, metavar="K/N",
                     help="run only group K of N of the test files (tests/support/groups.py); `make test` runs "
                          "the N groups at once (tests/support/run_groups.py)")


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--group")
    if not spec:
        return
    from support.groups import assign

    k, n = (int(x) for x in spec.split("/"))
    groups = assign(sorted({item.path.name for item in items}), n)
    keep = [item for item in items if groups[item.path.name] == k - 1]
    config.hook.pytest_deselected(items=[item for item in items if groups[item.path.name] != k - 1])
    items[:] = keep
