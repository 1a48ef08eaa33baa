"""Training: one loop over any backend.

    trainer.py      Trainer: the loop (steps, evaluation, checkpoints, logging, stopping), handed
                    everything it works with, so tests drive it with a fake backend
    run.py          build_trainer(cfg) builds the real pieces; train(cfg) runs them in a rank
    divergence.py   when a run diverges (non-finite steps, loss spikes): decided alike on every rank
    stragglers.py   the rank whose own work in a step takes longest, named with its host
"""
