"""Errors every job shares."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and says what is wrong."""
