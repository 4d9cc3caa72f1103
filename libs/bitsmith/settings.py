"""Settings read from text an operator wrote (environment variables), refused with the setting's name."""

from __future__ import annotations

from bitsmith.errors import ConfigError


def positive_int(text: str, name: str, unit: str = "count") -> int:
    """`text` as a whole number >= 1, else `ConfigError` naming `name` and what it holds (its `unit`)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name} must be a {unit} >= 1, got {text!r}")
    return value
