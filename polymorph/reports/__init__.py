"""Reports built from polymorph's outputs (the W&B report across ablations)."""
