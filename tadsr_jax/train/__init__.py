"""Training: the train state and step, checkpoints, the loop, and the offline tiny SD stand-in."""
