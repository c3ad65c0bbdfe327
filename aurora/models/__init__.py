"""Models: loading real checkpoints offline, tiny random presets, the target runner, drafts."""
