"""The stream as a torch IterableDataset: DataLoader(stream, batch_size=None) without loader workers."""

import torch

from conftest import open_stream


def test_stream_serves_a_dataloader_without_workers(daemon):
    stream = open_stream(daemon.address, batch_size=16, prefetch=4, dataset="digits", pipeline="lenet5")
    assert isinstance(stream, torch.utils.data.IterableDataset)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
    seen = []
    for batch in loader:
        assert batch.images.dtype == torch.float32 and tuple(batch.images.shape[1:]) == (1, 32, 32)
        seen.extend(batch.sample_ids.tolist())
    assert sorted(seen) == list(range(stream.samples_per_epoch))
