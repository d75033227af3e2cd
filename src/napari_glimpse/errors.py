"""User-facing errors: one clear line, no traceback, from the CLI."""


class GlimpseError(Exception):
    """A problem with the user's input (files, data, model) rather than a bug."""


class GlimpseWarning(UserWarning):
    """Something in the user's input was repaired (e.g. NaN pixels); the CLI prints it as one
    ``napari-glimpse: warning: ...`` line."""


def printable(text: str) -> str:
    """``text`` with the bytes of file names that are not UTF-8 (``os.fsdecode``'s surrogates)
    shown as ``\\xNN`` escapes: printable on any stream."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
