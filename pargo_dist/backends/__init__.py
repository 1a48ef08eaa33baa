"""How a model is spread over ranks. The training loop talks to a backend through a small
interface (setup, forward_backward, step, save, load, export) and does not care which."""
