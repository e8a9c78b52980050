"""The exceptions a caller of actstore can catch; see `actstore.schemas.errors` for what each one means."""

from actstore.schemas.errors import ConfigError, MismatchError, NotFoundError, UnsafeInputError, UserError

__all__ = ["ConfigError", "MismatchError", "NotFoundError", "UnsafeInputError", "UserError"]
