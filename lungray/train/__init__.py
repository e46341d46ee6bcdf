"""Training: the Ray Train loop and what runs inside it on each worker."""
