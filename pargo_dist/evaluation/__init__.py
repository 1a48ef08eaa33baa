"""Evaluation: held-out caption loss, detail recall of generated captions, MME-style yes/no.

`details` and `mme` are pure functions over text (parsing and scoring, no model); `runner`
drives a model over a dataset on one or many ranks, resumably. `pargo-dist eval` is the CLI.
"""
