"""`pargo-dist export`: a checkpoint of any backend and layout -> one HF directory.

    hf.py                  the export: weights by HF names, tokenizer, processor, verification
    portable.py            the code an export ships, so plain transformers loads it
    safetensors_shards.py  writing safetensors shards while tensors arrive, one shard in memory
"""
