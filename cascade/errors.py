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


class MissingArtifactError(RuntimeError):
    """A tier cannot load because a trained artefact is missing; `fix` is the command that makes it."""

    def __init__(self, what: str, fix: str) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} is missing; create it with: {fix}")
