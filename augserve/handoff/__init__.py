"""Local hand-off: batches for a trainer on the worker's host go through shared memory, not the wire.

One slot lifecycle (:mod:`.slots`) with two memories: host shared memory (:mod:`.shm`; page-locked
for a worker on a GPU, :mod:`.pinned`) and, for a worker on the trainer's own GPU, device memory shared
through CUDA IPC (:mod:`.device`, its CUDA calls in :mod:`.cuda`). A way for a worker to tell it shares
the trainer's memory (:mod:`.host`), the route of each batch (:mod:`.policy`), and the two ends: the
worker's :class:`~.sender.Sender` and the trainer's :class:`~.receiver.SlotReader` and
:class:`~.device_receiver.DeviceSlotReader`. ZeroMQ carries a small ``shm_batch`` or ``cuda_batch``
descriptor (:mod:`augserve.protocol`) instead of the images' bytes; workers on other hosts keep sending
frames, chosen per batch.
"""
