"""The `actstore` command: argument parsing and printing, one module per command group.

`main` builds the parser from the command table in `main.py`; the step commands' options come from their configs.
"""

from actstore.flows.cli.main import main

__all__ = ["main"]
