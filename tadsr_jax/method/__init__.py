"""The TADSR method: the one-step generator (and, for training, its teacher and fake-score views)."""
