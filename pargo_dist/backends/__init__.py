"""Backends spread the model over ranks and run one optimizer step over collated micro-batches.

    base.py              the contract the loop calls (a typing.Protocol), and nothing more
    deepspeed/           ZeRO-1/2/3 (+offload), buffers, the universal (elastic) conversion
    megatron/            megatron-core TP/PP/EP: model, conversion, weights, layout, CPU shims
    optim.py             what both optimizers share: a learning rate per model part, the schedule
    compile.py           train.compile: torch.compile per transformer block
    trained_weights.py   a checkpoint's weights by HF names, whatever backend wrote them

They know nothing of data formats beyond the collated batch (pargo_dist/batch.py).
"""
