"""Ray Tune sweeps over attack hyper-parameters: trainable, search spaces, schedulers, progress metrics.

``config`` (SweepConfig and its presets), ``space`` (search dimensions), ``targets`` (data,
victim and Serve app of a target), ``trainable`` (the Tune trial), ``mlflow_callback`` (one
MLflow child run per trial, written by the driver), ``summary`` (Table 1 and Table 2 rows),
``sweep`` (``run_sweep``, the main job's body), ``metrics`` (Ray gauges for Grafana).
Import the modules themselves: importing this package starts nothing and imports no Ray.
"""
