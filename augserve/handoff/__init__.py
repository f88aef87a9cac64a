"""Local hand-off: batches for a trainer on the worker's host go through shared memory, not the wire.

One slot lifecycle (:mod:`.slots`), host shared memory as its memory (:mod:`.shm`), a way for a worker
to tell it shares the trainer's memory (:mod:`.host`), and the two ends: the worker's
:class:`~.sender.Sender` and the trainer's :class:`~.receiver.SlotReader`. ZeroMQ carries a small
``shm_batch`` descriptor (:mod:`augserve.protocol`) instead of the batch's bytes; workers on other
hosts keep sending frames, chosen per batch.
"""
