"""User-facing errors: one clear line, no traceback, from the CLI."""


class GlimpseError(Exception):
    """A problem with the user's input (files, data, model) rather than a bug."""
