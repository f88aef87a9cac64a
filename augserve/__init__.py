"""augserve: a data-augmentation service for PyTorch.

    from augserve import connect
    stream = connect("tcp://127.0.0.1:5555", dataset="digits", pipeline="lenet5", batch_size=256)
    for batch in stream:
        batch.images, batch.labels, batch.sample_ids, batch.epoch

    from augserve import Loader            # a drop-in for a training DataLoader: one epoch per iter()
    loader = Loader("tcp://127.0.0.1:5555", dataset="digits", pipeline="lenet5", batch_size=64)
"""

__version__ = "0.1.0"


def connect(address, dataset, pipeline, batch_size, **options):
    """Attach to a daemon and return a :class:`augserve.client.Stream` (imported lazily: the CLI and
    worker processes need not load the client)."""
    from .client import connect as _connect

    return _connect(address, dataset, pipeline, batch_size, **options)


def __getattr__(name: str):
    """``augserve.Loader``, imported on first use (it needs torch, as the client does)."""
    if name == "Loader":
        from .loader import Loader

        return Loader
    raise AttributeError(f"module 'augserve' has no attribute {name!r}")


__all__ = ["Loader", "__version__", "connect"]
