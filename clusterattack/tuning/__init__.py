"""Ray Tune sweeps over attack hyper-parameters: trainable, search spaces, schedulers, progress metrics."""
