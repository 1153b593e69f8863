"""The errors a user can cause: bad config, missing files, unreachable clusters, held locks.

    from pipelines.errors import UserError, ConfigError
    raise ConfigError("steps=0: must be >= 1; set steps to the number of optimizer steps")

Every user-facing error of `pipelines` inherits `UserError`; `gptcore`'s inherit `gptcore.errors.GPTError`.
The CLI (pipelines/cli.py) catches `USER_ERRORS` once and prints the message alone (exit 2); anything
else is a bug and keeps its traceback. Messages name the parameter, the constraint, the value and the
fix. Does not: import ray, torch or any stage.
"""

from __future__ import annotations

from gptcore.errors import GPTError


class UserError(Exception):
    """An error caused by the user's input or environment; printed without a traceback."""


class ConfigError(UserError, ValueError):
    """A config value breaks a constraint (the message names field, constraint, value and fix)."""


# what the CLI prints as a one-line error instead of a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, GPTError)
