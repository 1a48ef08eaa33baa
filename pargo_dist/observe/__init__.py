"""What a run shows while and after it trains, on rank 0 only.

    metrics.py     step timing, peak memory, the logger (TensorBoard scalars and text, the
                   console progress line)
    trackers.py    Weights & Biases and MLflow, when a recipe names them
    report.py      `pargo-dist report`: PNG plots and a markdown table from TensorBoard logs
"""
