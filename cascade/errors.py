"""Errors the engine and its configuration raise."""


class ConfigError(ValueError):
    """A configuration file is malformed; the message names the file, the key and what was expected."""

    def __init__(self, source: str, key: str, expected: str, got: object = None) -> None:
        self.source = source
        self.key = key
        self.expected = expected
        self.got = got
        detail = f"{source}: key '{key}': expected {expected}"
        if got is not None:
            detail += f", got {got!r}"
        super().__init__(detail)
