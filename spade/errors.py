"""The one exception type the command line turns into a single clear line."""


class SpadeError(Exception):
    """A problem with the user's input or files, explained in the message."""
