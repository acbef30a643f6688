"""Real-data examples: k-fold MIL training/evaluation (train), base vs base_mammoth
comparison (compare) and routing pictures (routing). Needs the `examples` extra."""
