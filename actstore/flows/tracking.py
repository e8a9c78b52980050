"""Whether this process's flow and task calls go through Prefect: a module with no imports of weight, because
the CLI asks it before any flow (and Prefect with it) is loaded."""

_untracked_allowed = False


def allow_untracked_runs() -> None:
    """Let flows started in this process run as plain calls when no Prefect server is configured.

    The CLI's single-step commands call this: with no `PREFECT_API_URL`, Prefect 3 would start a temporary
    server for every command (8-15 s here, more than the work of a re-run), so the flow runs without one.
    With a server configured the runs are recorded there as always; `run`, `serve` and Dask never call this."""
    global _untracked_allowed
    _untracked_allowed = True


def tracked() -> bool:
    """Whether calls of our flows and tasks go through Prefect (a run is recorded) or are plain calls."""
    if not _untracked_allowed:
        return True
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() is not None or FlowRunContext.get() is not None or TaskRunContext.get() is not None
