"""Prefect flows that compose store and transforms: one module per step flow (ingest, harvest, train, encode,
eval, ...), and the rooms `cli/` (the `actstore` command), `dashboard/` and `orchestration/` (pipelines, serve,
Dask)."""
