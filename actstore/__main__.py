"""`python -m actstore ...` is the `actstore` command."""

import sys

from actstore.flows.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
