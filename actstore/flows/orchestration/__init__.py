"""Running whole pipelines: the `pipeline` flow from one config file, its report, the Prefect server it needs for
schedules and Dask, `serve` for scheduled deployments, and where shard tasks run (in process or on Dask)."""
