"""The error a user's config mistake raises, and the check that raises it."""
from __future__ import annotations


class ForgeConfigError(ValueError):
    """A config field has a value the method cannot use; the message names the field and the fix."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise `ForgeConfigError("<field>: <message>")` unless `condition` holds."""
    if not condition:
        raise ForgeConfigError(f"{field}: {message}")
