"""The one exception type that reaches users as a single line.

Every layer raises `UserError` for problems the user can fix (a wrong site name, a missing model, a full
disk); the CLI prints `error: <message>` and exits non-zero. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment; the message names the input and the fix."""

    exit_code: int = 2
