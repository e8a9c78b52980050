"""Prefect flows that compose store and transforms, and the `actstore` CLI."""
