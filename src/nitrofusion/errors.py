"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class NitroFusionError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


class ConfigError(NitroFusionError):
    """An unknown key, a wrong type or an out-of-range value in a config."""


def describe(e: BaseException) -> str:
    """One plain line for an exception a reader raised: its type and first line, ANSI codes removed, and for a
    refused pickle the reason in our words (torch's own text advises weights_only=False, the unsafe choice)."""
    import re

    if type(e).__name__ == "UnpicklingError":
        return "it holds pickled Python objects beyond plain tensors, which are never loaded"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
