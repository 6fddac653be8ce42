"""The errors a user's input raises: one line each, naming the key or file and the fix."""

from __future__ import annotations

# The largest integer a config or tool argument takes: exact in a double (JSON readers, wandb,
# YAML) and far inside torch's int64; a field with a tighter range checks it itself.
MAX_INT = 2**53


class UserError(Exception):
    """Bad input from the user (config, data, launch environment).

    The launcher prints ``str(error)`` as a single line and exits with status 2.
    """


class ConfigError(UserError):
    """A config value is wrong. ``key`` is the dotted key; sections prefix it as it bubbles up."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.message = message
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"config error: {where}{self.key}: {self.message}"


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)
