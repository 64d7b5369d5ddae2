"""Training: the train state and step, the loop, validation, the workdir lock, ahead-of-time compilation."""
