"""The feature dashboard: a static HTML site per SAE x harvest, gathered (`data`, `results`), drawn (`plots`) and
written (`pages`, with the files in `static/`) by the `dashboard` flow."""

from actstore.flows.dashboard.flow import dashboard

__all__ = ["dashboard"]
