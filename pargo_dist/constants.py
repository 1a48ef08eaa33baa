"""Names and values every layer shares, in a module that imports nothing (no torch): the config,
the launcher and the planner read them without paying for torch."""

IGNORE_INDEX = -100  # a label the loss skips (prompt, image placeholders, padding)

# The MLLM's three top-level modules, in data-flow order: image -> features -> visual tokens -> text.
PARTS = ("vision_tower", "projector", "language_model")

# Training stages as named presets: which parts train (prismatic-style).
STAGES: dict[str, tuple[str, ...]] = {
    "align": ("projector",),  # stage 1: projector only; vision and LLM frozen
    "finetune": ("projector", "language_model"),  # stage 2: projector + LLM
    "full": ("projector", "language_model", "vision_tower"),  # everything
}
