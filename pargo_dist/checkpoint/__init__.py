"""Checkpoints: the format, its life on disk, and its copy in object storage.

    state.py            TrainState (meta.json) and the RNG states each rank keeps; the file names
    manager.py          CheckpointManager: begin, commit (marker after every rank wrote), resolve,
                        resume downloads, pruning; resolve_checkpoint for export and eval
    files.py            files that are whole or absent: atomic writes, fsync, tolerant reads
    pruning.py          keep_last, and deleting a step directory marker first
    background_save.py  copying state to host memory and writing it off the training thread
    upload.py           checkpoint.remote uploads on a thread per rank, through outages
    object_store.py     the store: list, upload, download, prune, retries, permanent errors

Nothing here knows a backend: a backend writes its own files into the step directory the
manager hands it (`ds/` or `megatron/`), and the manager only counts what is whole.
"""
