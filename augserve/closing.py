"""``Closing``: a resource with a ``close()`` is a context manager and closes when collected."""

from __future__ import annotations


class Closing:
    """Mixin for objects holding sockets or threads: ``with obj:`` closes it at the end of the block,
    and garbage collection closes it too (quietly: the interpreter may be shutting down)."""

    def close(self) -> None:  # pragma: no cover - every user defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
