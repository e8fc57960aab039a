"""User-facing errors: one line that says what is wrong and how to fix it."""


class PolymorphError(Exception):
    """A problem with the user's input, config or files (not a bug in polymorph)."""
