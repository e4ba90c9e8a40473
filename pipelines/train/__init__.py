"""The pretraining trainer (`trainer`): optimizer and schedule (`optim`), atomic checkpoints
(`checkpoints`), metrics, TensorBoard and loss plots (`metrics`), host-sync counting (`host_syncs`)."""
