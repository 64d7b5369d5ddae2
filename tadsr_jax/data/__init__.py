"""Training data: sources of (HR, LR, prompt) records and the grain pipeline that batches them per process."""

from tadsr_jax.data.pipeline import data_config, make_train_iterator

__all__ = ["data_config", "make_train_iterator"]
