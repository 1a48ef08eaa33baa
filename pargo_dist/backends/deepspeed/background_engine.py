"""DeepSpeed's checkpoint engine with background writes (`checkpoint.async_save`).

Its own module: the backend (backends/deepspeed/backend.py) only swaps it in around a save, and the
copying and writing themselves are pargo_dist/checkpoint/background_save.py's, shared with megatron.
"""

from __future__ import annotations

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from pargo_dist.checkpoint.background_save import BackgroundWriter, save_file


class BackgroundCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with each file's state copied to host memory and
    written by background threads (pargo_dist.checkpoint.background_save). DeepSpeed builds the state
    dicts at the step boundary; they hold the live tensors, which nothing changes before the next
    optimizer update, and `train_batch` waits for the copies before that (`wait_staged`)."""

    def __init__(self, writer: BackgroundWriter, zipfile: bool):
        super().__init__(None)
        self.writer, self.zipfile = writer, zipfile

    def save(self, state_dict, path: str) -> None:
        self.writer.submit(path, state_dict, lambda copy: save_file(copy, path, zipfile=self.zipfile))


