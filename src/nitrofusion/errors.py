"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class NitroFusionError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


class ConfigError(NitroFusionError):
    """An unknown key, a wrong type or an out-of-range value in a config."""
