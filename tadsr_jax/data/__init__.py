"""Training data: sources of (HR, LR, prompt) records and the grain pipeline that batches them per process."""

from tadsr_jax.data.pipeline import make_train_iterator

__all__ = ["make_train_iterator"]
