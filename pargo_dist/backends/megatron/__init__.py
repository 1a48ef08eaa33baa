"""The megatron-core backend: tensor, pipeline and expert parallel LLM, data parallel over the rest.

    backend.py     MegatronBackend: process groups, the distributed optimizer, step, save, load
    model.py       the ParGo MLLM with a megatron GPTModel as its LLM (one pipeline stage)
    layout.py      which models megatron holds, at which TP x PP x EP (torch-free: the launcher
                   and the planner check a layout before any rank starts)
    convert.py     HF <-> megatron weights at any layout
    weights.py     a megatron checkpoint's weights by HF names, one decoder layer at a time
    attention.py   megatron's core attention as one torch SDPA call
    cpu.py         every CPU-only workaround for megatron-core, in one place
"""
