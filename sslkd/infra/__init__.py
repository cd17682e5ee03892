"""Infrastructure a stage runs on, not what it computes: its device, MLflow tracking, signals, host memory and the
launchers' settings. Running a stage (inline or as jobs) is sslkd.runner's; this layer imports only the ground
and sslkd.store (docs/architecture.md)."""
