"""Errors raised by image sources."""

from __future__ import annotations

import os


class CorruptImageError(ValueError):
    """A file that cannot be read or decoded as an image.

    A ``ValueError`` so that callers which already treat bad input as ``ValueError`` keep working;
    ``path`` names the offending file so a worker can report or skip exactly that sample.
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        message = f"corrupt or unreadable image: {self.path}"
        if reason:
            message += f" ({reason})"
        super().__init__(message)

    def __reduce__(self):
        # The default exception pickling replays ``args`` (the formatted message) into __init__,
        # which would turn the message into the path when the error crosses a process boundary.
        return (type(self), (self.path, self.reason))
