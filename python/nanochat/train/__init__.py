"""Training: the loop, checkpoints, logs and the ``nanochat-train`` CLI."""
