"""The one error type a user sees as a single line and exit code 2."""


class ConfigError(Exception):
    """Bad input: a space, flag, data source or weights source that cannot work."""
