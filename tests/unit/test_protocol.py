"""The wire format: round trips, zero-copy wrapping, and clear refusals of anything else."""

import msgpack
import numpy as np
import pytest
import torch

from augserve import protocol as P


def test_round_trip_with_tensors():
    images = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    labels = np.array([3, 7], dtype=np.int64)
    frames = P.encode("batch", {"stream": "s", "tensors": [P.describe("images", images), P.describe("labels", labels)]}, [P.tensor_buffer(images), P.tensor_buffer(labels)])
    message = P.decode([bytes(f) for f in frames], {"batch"})
    tensors = P.frames_to_tensors(message.get("tensors"), message.buffers)
    assert torch.equal(tensors["images"], torch.from_numpy(images)) and tensors["labels"].tolist() == [3, 7]


def test_frames_are_wrapped_without_copy():
    buffer = bytearray(np.arange(12, dtype=np.float32).tobytes())
    tensors = P.frames_to_tensors([{"name": "x", "dtype": "float32", "shape": [3, 4]}], [buffer])
    buffer[0:4] = np.float32(42).tobytes()
    assert tensors["x"][0, 0].item() == 42.0  # the tensor is a view of the received bytes


def test_bfloat16_travels_as_raw_words():
    x = torch.randn(3, 5).to(torch.bfloat16)
    frames = P.encode("batch", {"tensors": [P.describe("x", x)]}, [P.tensor_buffer(x)])
    message = P.decode([bytes(f) for f in frames])
    assert torch.equal(P.frames_to_tensors(message.get("tensors"), message.buffers)["x"], x)


@pytest.mark.parametrize(
    "frames, match",
    [
        ([], "empty message"),
        ([b"\x00\xff garbage"], "not an augserve message"),
        ([msgpack.packb({"proto": "other", "v": 1, "type": "attach"})], "not an augserve message"),
        ([msgpack.packb({"proto": "augserve", "v": 999, "type": "attach"})], "unsupported protocol version 999: this peer speaks version 1"),
        ([msgpack.packb({"proto": "augserve", "v": 1, "type": "attach", "dataset": "digits"})[:-4]], "malformed header"),
        ([msgpack.packb({"proto": "augserve", "v": 1, "type": "explode"})], "unexpected message type 'explode'"),
        ([msgpack.packb([1, 2, 3])], "not an augserve message"),
    ],
)
def test_bad_messages_are_refused_clearly(frames, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.decode(frames)


def test_unexpected_type_for_the_receiver():
    with pytest.raises(P.ProtocolError, match="unexpected message type 'task'"):
        P.decode(P.encode("task", {}), P.CLIENT_TO_DAEMON)


def test_frame_size_must_match_its_descriptor():
    with pytest.raises(P.ProtocolError, match="frame has 10 bytes, header says 12"):
        P.frames_to_tensors([{"name": "x", "dtype": "uint8", "shape": [3, 4]}], [b"0123456789"])
    with pytest.raises(P.ProtocolError, match="describes 1 tensors but 0 frames"):
        P.frames_to_tensors([{"name": "x", "dtype": "uint8", "shape": [1]}], [])
    with pytest.raises(P.ProtocolError, match="unsupported dtype"):
        P.frames_to_tensors([{"name": "x", "dtype": "object", "shape": [1]}], [b"0"])


def test_missing_fields_are_named():
    message = P.decode(P.encode("credit", {"acks": []}))
    with pytest.raises(P.ProtocolError, match="lacks field\\(s\\): stream"):
        message.require("stream")


def test_headers_are_never_pickled():
    frames = P.encode("attach", {"dataset": "digits"})
    assert b"\x80\x04" not in frames[0][:2]  # not a pickle protocol marker
    assert msgpack.unpackb(frames[0])["dataset"] == "digits"
