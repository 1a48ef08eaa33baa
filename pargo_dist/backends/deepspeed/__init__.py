"""The DeepSpeed backend: ZeRO stage 0-3 (optional CPU offload) around the HF model.

    backend.py            DeepSpeedBackend: the engine, its config, set-up, step, save and load
    buffers.py            gradient buckets and ZeRO-3's gathered-parameter limits sized to the
                          model (the planner uses the same function)
    background_engine.py  DeepSpeed's checkpoint engine with background writes
    universal.py          the elastic conversion to DeepSpeed's universal format, in a process of
                          its own, once per filesystem
    universal_patch.py    rewriting universal files so that every ZeRO stage loads them
"""
