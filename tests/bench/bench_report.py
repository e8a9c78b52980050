"""How every benchmark script ends: its results as markdown, printed, and written to `--out` when given.

The scripts run as `python tests/bench/<name>.py`, so this folder is first on the import path."""

from collections.abc import Sequence
from pathlib import Path


def measure_table(header: str, rows: Sequence[tuple[str, str]]) -> str:
    """A header line, then a two-column `measure | value` table."""
    return "\n".join([header, "", "| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def publish(table: str, out: Path | None) -> None:
    print(table)
    if out:
        out.write_text(table + "\n")
