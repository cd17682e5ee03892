"""Running a stage: inline (the stage registry) or as submitit jobs (launch, stage_job).

The top of the package with sslkd.cli: imports everything below, nothing imports it: docs/architecture.md."""
