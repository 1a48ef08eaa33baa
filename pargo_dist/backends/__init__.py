"""Backends spread the model over ranks and run one optimizer step over collated micro-batches.

Both (`deepspeed.DeepSpeedBackend`, `megatron.MegatronBackend`) offer: init_distributed,
replication (consecutive ranks that read the same samples), setup(hf_model),
train_batch(micro_batches, targets, step), eval_loss_sum, learning_rates, grad_norm,
save / load(step_dir). They know nothing of data formats beyond the collated batch.
"""
