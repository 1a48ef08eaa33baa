"""Data: raw caption / instruction files -> MDS shards -> streamed, tokenized batches."""
