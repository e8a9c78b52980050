"""The exceptions that reach users as a single line: a small tree whose root is `UserError`.

Every layer raises a `UserError` for problems the user can fix (a wrong site name, a missing model, a full
disk); the CLI prints `error: <message>` and exits 2. Anything else is a bug and keeps its traceback. The
subtypes let a notebook catch what it means, and each is also the stdlib exception an `except` clause would
name, as zarr's `NodeNotFoundError` is also a `FileNotFoundError`:

- `NotFoundError` (also a `LookupError`): no such object, site, model, SAE, table or file;
- `MismatchError` (also a `ValueError`): inputs that exist but do not fit together (an SAE's `d_in` against a
  site, a corpus tokenized for another model, an existing object made with another config);
- `ConfigError` (also a `ValueError`): a value outside its bounds or a malformed option or config file;
- `UnsafeInputError` (also a `ValueError`): input refused on purpose (a pickle, a path escaping the store).
"""


class UserError(Exception):
    """A problem with the user's input or environment; the message names the input and the fix."""

    exit_code: int = 2


class NotFoundError(UserError, LookupError):
    """Something named by the user does not exist (yet): an object id, a site, a file, a model."""


class MismatchError(UserError, ValueError):
    """Inputs that each exist but do not fit together."""


class ConfigError(UserError, ValueError):
    """A value or option that is malformed or out of bounds."""


class UnsafeInputError(UserError, ValueError):
    """Input refused because reading it could run code or escape the store."""
