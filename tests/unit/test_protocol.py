"""The wire format: typed round trips of every message, zero-copy tensors, and refusals that name the field."""

import re

import msgpack
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from augserve import protocol as P

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a Z85 CURVE public key (the zguide's example)
SPEC = {"name": "tiny", "ops": [{"op": "hflip", "p": 0.5}, {"op": "rotate", "degrees": 15.0}]}
DATASET = P.DatasetRef(ref="digits", split="test", options={"size": 32, "kind": "gray"})
IMAGES = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
LABELS = np.array([3, 7], dtype=np.int64)
HELLO = dict(worker="w-1", pid=4242, host="node7", backend="torch", device="cuda:0", capacity=3)
SHM_HOST = P.ShmHost(boot="09dde2b3-449f-4477-99bd-e65768717057", dev=27, ino=1, uid=1000)
SEGMENT = "augserve-slot-4026531836-4242-0123456789abcdef"
GPU = P.CudaDevice(uuid="5e8f0b1c-2d3a-4b5c-8d9e-0f1a2b3c4d5e")
CUDA_MEMORY = P.CudaMemory(handle=b"\x02c" + bytes(range(64)), size=1 << 20, offset=4096, ref_counter="/torch_4242_1234567_0", ref_counter_offset=3)

# One valid instance per message type, every optional field set to something other than its default so the
# round trip covers it (encode leaves defaults out). A type added to P.MESSAGES without a sample here fails
# test_every_message_type_has_a_sample.
SAMPLES = {
    "attach": P.Attach(
        dataset="digits", split="test", dataset_options={"size": 32, "kind": "gray"}, pipeline=SPEC, batch_size=16,
        seed=7, epochs=3, rank=1, world_size=2, prefetch=4, ordered=True, shuffle=False, drop_last=True,
        on_error="raise", data="tcp://127.0.0.1:5555", data_key=KEY,
        resume=P.ResumeState(epoch=1, delivered=[0, 2, 5], fingerprint={"dataset": "digits", "n": 1797}), client="me",
        transport="cuda-ipc", shm_host=SHM_HOST, cuda=GPU,
    ),
    "credit": P.Credit(stream="s1", acks=[(0, 1, 16), (0, 2, 16)], received=[(0, 3)], final=True),
    "detach": P.Detach(stream="s1"),
    "status": P.Status(),
    "update": P.Update(stream="s1", request="r1", spec="name: x\nops: []\n", changes={"rotate.degrees": 20, "hflip.p": 0.25}),
    "attached": P.Attached(
        stream="s1", batches_per_epoch=12, samples_per_epoch=180, num_samples=360, start_epoch=1, skip=[0, 3],
        pipeline_version=2, spec=SPEC, dataset=P.DatasetInfo(name="digits", split="train", classes=["0", "1"], channels=1),
        fingerprint={"dataset": "digits", "version": 1}, worker_keys=[KEY], max_batch_bytes=1 << 20,
    ),
    "error": P.Error(message="no such dataset", code="bad_request", stream="s1", request="r1"),
    "status_reply": P.StatusReply(status={"streams": [{"stream": "s1", "acked": 3}], "workers": 2, "rate": 12.5}),
    "stream_error": P.StreamError(stream="s1", message="corrupt image a.png", kind="corrupt"),
    "updated": P.Updated(stream="s1", version=3, from_epoch=1, from_index=4, spec=SPEC, request="r1"),
    "ready": P.Ready(**HELLO),
    "heartbeat": P.Heartbeat(**HELLO),
    "done": P.Done(
        worker="w-1", task="s1:0:3", stream="s1", epoch=0, index=3, samples=16, skipped=1, skipped_paths=["a.png"],
        bytes=4096, times=P.StageTimes(load=0.01, augment=0.02, send=0.003),
    ),
    "failed": P.Failed(worker="w-1", task="s1:0:3", stream="s1", message="boom", kind="unreachable"),
    "bye": P.Bye(worker="w-1"),
    "task": P.Task(
        task="s1:0:3", stream="s1", epoch=0, index=3, ids=[5, 9, 1], seed=11, dataset=DATASET,
        pipeline=P.PipelineRef(stream="s1", version=2, spec=SPEC), data="tcp://127.0.0.1:5555", data_key=KEY, on_error="raise",
        handoff=P.Handoff(mode="shm", host=SHM_HOST, slots=10, cuda=GPU),
    ),
    "drop": P.Drop(data="tcp://127.0.0.1:5555"),
    "stop": P.Stop(),
    "ping": P.Ping(),
    "batch": P.BatchHeader(
        stream="s1", task="s1:0:3", epoch=0, index=3, pipeline_version=2, skipped=["a.png"], worker="w-1",
        tensors=[P.describe("images", IMAGES), P.describe("labels", LABELS)],
        fallback=P.Fallback(kind="no_space", message="/dev/shm has 60.0 MB free"),
    ),
    "shm_batch": P.ShmBatch(
        stream="s1", task="s1:0:3", epoch=0, index=3, pipeline_version=2, skipped=["a.png"], worker="w-1", segment=SEGMENT, generation=7,
        tensors=[P.SlotTensor(name="images", dtype="uint8", shape=[2, 4, 5, 3], offset=0), P.SlotTensor(name="labels", dtype="int64", shape=[2], offset=128)],
        retired=["augserve-slot-4026531836-4242-fedcba9876543210"], fallback=P.Fallback(kind="other_gpu", message="the worker's cuda:1 is another GPU"),
    ),
    "cuda_batch": P.CudaBatch(
        stream="s1", task="s1:0:3", epoch=0, index=3, pipeline_version=2, skipped=["a.png"], worker="w-1", segment=SEGMENT, generation=7,
        gpu=GPU, memory=CUDA_MEMORY, event=bytes(range(64, 128)), images=P.SlotTensor(name="images", dtype="uint8", shape=[2, 4, 5, 3], offset=0),
        tensors=[P.describe("labels", LABELS)], retired=["augserve-slot-4026531836-4242-fedcba9876543210"],
    ),
}


def header(type_: str, **fields) -> bytes:
    """A header frame built by hand, the way a foreign or hostile peer could send it."""
    return msgpack.packb({"proto": "augserve", "v": P.PROTOCOL_VERSION, "type": type_, **fields}, use_bin_type=True)


def refused(frames, expected=None) -> str:
    with pytest.raises(P.ProtocolError) as info:
        P.decode(frames, expected)
    return str(info.value)


DONE = dict(worker="w", task="t", stream="s", epoch=0, index=0, samples=1)
READY = dict(HELLO)


# --- round trips ------------------------------------------------------------------------------------------


def test_every_message_type_has_a_sample():
    assert set(SAMPLES) == set(P.MESSAGES)
    assert all(type(body) is P.MESSAGES[name] for name, body in SAMPLES.items())


@pytest.mark.parametrize("name", sorted(P.MESSAGES))
def test_round_trip_of_every_message_type(name):
    body = SAMPLES[name]
    buffers = [P.tensor_buffer(IMAGES), P.tensor_buffer(LABELS)] if name == "batch" else [P.tensor_buffer(LABELS)] if name == "cuda_batch" else []
    frames = [bytes(f) for f in P.encode(body, buffers)]
    assert len(frames) == 1 + len(buffers)
    message = P.decode(frames, {name})
    assert message.type == name
    assert type(message.body) is type(body)
    assert message.body == body
    assert [bytes(b) for b in message.buffers] == [bytes(b) for b in buffers]


@pytest.mark.parametrize(
    "direction, types",
    [
        (P.CLIENT_TO_DAEMON, {"attach", "credit", "detach", "status", "update"}),
        (P.DAEMON_TO_CLIENT, {"attached", "error", "status_reply", "stream_error", "updated"}),
        (P.WORKER_TO_DAEMON, {"ready", "heartbeat", "done", "failed", "bye"}),
        (P.DAEMON_TO_WORKER, {"task", "drop", "stop", "ping", "error"}),
        (P.WORKER_TO_CLIENT, {"batch", "shm_batch", "cuda_batch"}),
    ],
)
def test_each_direction_is_a_closed_set(direction, types):
    assert direction == types
    for name in sorted(P.MESSAGES):
        frames = P.encode(SAMPLES[name])
        if name in direction:
            if name != "batch":
                assert P.decode(frames, direction).type == name
        else:
            assert refused(frames, direction) == f"unexpected message type '{name}'"


def test_decoded_bodies_are_frozen():
    body = P.decode(P.encode(P.Detach(stream="s1"))).body
    with pytest.raises(ValidationError, match="frozen"):
        body.stream = "other"


def test_defaults_stay_off_the_wire_and_come_back():
    frames = P.encode(P.Credit(stream="s1"))
    assert msgpack.unpackb(frames[0]) == {"proto": "augserve", "v": P.PROTOCOL_VERSION, "type": "credit", "stream": "s1"}
    assert P.decode(frames).body == P.Credit(stream="s1", acks=[], received=[], final=False)


def test_headers_are_msgpack_never_pickle():
    frames = P.encode(SAMPLES["attach"])
    assert not frames[0].startswith(b"\x80")  # every pickle protocol >= 2 starts with PROTO (0x80)
    assert msgpack.unpackb(frames[0])["dataset"] == "digits"


def test_encode_refuses_a_body_that_is_not_a_message():
    with pytest.raises(ValueError, match="StageTimes is not a message type"):
        P.encode(P.StageTimes())


# --- refusals naming the field ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames, message",
    [
        # non-finite numbers, in typed fields and in free-form ones
        ([header("ready", **{**READY, "capacity": float("inf")})], "bad 'ready' message: capacity = inf: Input should be a finite number"),
        ([header("done", **DONE, times={"load": float("nan")})], "bad 'done' message: times.load = nan: Input should be a finite number"),
        ([header("done", **DONE, times={"send": float("-inf")})], "bad 'done' message: times.send = -inf: Input should be a finite number"),
        ([header("update", stream="s", changes={"rotate.degrees": float("nan")})], "bad 'update' message: changes.rotate.degrees = nan: not a finite number"),
        ([header("attach", dataset="d", pipeline={"ops": [{"op": "rotate", "degrees": float("inf")}]}, batch_size=1, data="tcp://x:1")],
         "bad 'attach' message: pipeline.ops.0.degrees = inf: not a finite number"),
        ([header("status_reply", status={"rate": [1.0, float("-inf")]})], "bad 'status_reply' message: status.rate.1 = -inf: not a finite number"),
        # wrong types
        ([header("done", **DONE, times=[])], "bad 'done' message: times = []: Input should be a valid dictionary or instance of StageTimes"),
        ([header("done", **{**DONE, "epoch": "zero"})], "bad 'done' message: epoch = 'zero': Input should be a valid integer"),
        ([header("done", **{**DONE, "samples": 1.5})], "bad 'done' message: samples = 1.5: Input should be a valid integer, got a number with a fractional part"),
        ([header("detach", stream=["s"])], "bad 'detach' message: stream = ['s']: Input should be a valid string"),
        ([header("credit", stream="s", acks=[[0, 1]])], "bad 'credit' message: acks.0.2: missing"),
        # out-of-range integers
        ([header("ready", **{**READY, "capacity": 65})], "bad 'ready' message: capacity = 65: Input should be less than or equal to 64"),
        ([header("ready", **{**READY, "capacity": 0})], "bad 'ready' message: capacity = 0: Input should be greater than or equal to 1"),
        ([header("done", **{**DONE, "index": 1 << 31})], "bad 'done' message: index = 2147483648: Input should be less than 2147483648"),
        ([header("done", **{**DONE, "epoch": -1})], "bad 'done' message: epoch = -1: Input should be greater than or equal to 0"),
        ([header("attach", dataset="d", pipeline="p", batch_size=1, data="tcp://x:1", prefetch=0)], "bad 'attach' message: prefetch = 0: Input should be greater than or equal to 1"),
        # over-long strings and lists
        ([header("detach", stream="s" * 129)], "bad 'detach' message: stream = 'sssssssss"),
        ([header("done", **DONE, skipped_paths=["p"] * 1025)], "bad 'done' message: skipped_paths = ['p', 'p'"),
        ([header("credit", stream="s", received=[[0, 0]] * (P.MAX_LISTED + 1))], f"List should have at most {P.MAX_LISTED} items after validation, not {P.MAX_LISTED + 1}"),
        # missing and unknown fields
        ([header("detach")], "bad 'detach' message: stream: missing"),
        ([header("detach", stream="s", path="/etc/passwd")], "bad 'detach' message: path = '/etc/passwd': Extra inputs are not permitted"),
        ([header("ping", extra=1)], "bad 'ping' message: extra = 1: Extra inputs are not permitted"),
        ([header("done", **DONE, times={"load": 0.1, "gpu": 0.2})], "bad 'done' message: times.gpu = 0.2: Extra inputs are not permitted"),
    ],
)
def test_bad_fields_are_refused_by_name(frames, message):
    assert message in refused(frames)


def test_over_long_strings_name_the_limit():
    assert refused([header("detach", stream="s" * 129)]).endswith("String should have at most 128 characters")
    assert refused([header("done", **DONE, skipped_paths=["p"] * 1025)]).endswith("List should have at most 1024 items after validation, not 1025")


def test_at_most_three_bad_fields_are_listed():
    text = refused([header("ready", worker="", pid=-1, host=1, backend=2, device=3, capacity=99)])
    assert text.count(" = ") == 3 and text.endswith("(and 3 more)")


def test_nesting_deeper_than_the_limit_is_refused():
    def nested(levels):  # header = level 1, "changes" = level 2, then `levels` lists
        value = 0
        for _ in range(levels):
            value = [value]
        return {"k": value}

    ok = P.decode([header("update", stream="s", changes=nested(P.MAX_DEPTH - 2))])
    assert ok.body.changes["k"] == nested(P.MAX_DEPTH - 2)["k"]
    assert refused([header("update", stream="s", changes=nested(P.MAX_DEPTH - 1))]) == f"'update' header nests more than {P.MAX_DEPTH} levels deep"
    # far deeper than msgpack itself unpacks: still a ProtocolError, never RecursionError
    entries = ["proto", "augserve", "v", P.PROTOCOL_VERSION, "type", "update", "stream", "s", "changes"]
    bomb = b"\x85" + b"".join(msgpack.packb(e) for e in entries) + b"\x91" * 100_000 + b"\x00"  # 100 000 nested lists
    assert refused([bomb]).startswith("malformed header (")


def test_text_depth():
    assert P.text_depth("[" * 30 + "]" * 30) == 30
    assert P.text_depth("{a: [1, {b: [2]}], c: []}") == 4
    assert P.text_depth("name: plain\nops: []") == 1
    assert P.text_depth("") == 0
    assert P.text_depth("]]]]][") == 1  # stray closers never go below zero
    assert P.text_depth("'[[['") == 3  # an over-estimate: quoted brackets count too


def test_a_control_message_carries_no_frames():
    assert refused([header("detach", stream="s"), b"x"]) == "'detach' message has 1 extra frame(s); at most 0 allowed"
    assert refused(P.encode(P.Ping(), [b"a", b"b"])) == "'ping' message has 2 extra frame(s); at most 0 allowed"


def test_a_batch_carries_at_most_max_buffers_frames():
    body = SAMPLES["batch"]
    assert len(P.decode(P.encode(body, [b""] * P.MAX_BUFFERS)).buffers) == P.MAX_BUFFERS
    text = refused(P.encode(body, [b""] * (P.MAX_BUFFERS + 1)))
    assert text == f"'batch' message has {P.MAX_BUFFERS + 1} extra frame(s); at most {P.MAX_BUFFERS} allowed"


def test_version_mismatch_names_both_versions():
    frames = [msgpack.packb({"proto": "augserve", "v": 1, "type": "attach"})]
    assert refused(frames) == f"unsupported protocol version 1: this peer speaks version {P.PROTOCOL_VERSION}"
    assert refused([msgpack.packb({"proto": "augserve", "type": "ping"})]) == f"unsupported protocol version None: this peer speaks version {P.PROTOCOL_VERSION}"


def test_wrong_direction_is_refused():
    assert refused(P.encode(SAMPLES["task"]), P.CLIENT_TO_DAEMON) == "unexpected message type 'task'"
    assert refused(P.encode(SAMPLES["attach"]), P.WORKER_TO_DAEMON) == "unexpected message type 'attach'"
    assert refused([header("explode")]) == "unexpected message type 'explode'"
    assert refused([msgpack.packb({"proto": "augserve", "v": P.PROTOCOL_VERSION, "type": 7})]) == "unexpected message type 7"


@pytest.mark.parametrize(
    "frames, message",
    [
        ([], "empty message"),
        ([b""], "malformed header (ValueError): not an augserve message"),
        ([b"\x00\xff garbage"], "malformed header (ExtraData): not an augserve message"),
        ([P.encode(SAMPLES["attach"])[0][:-4]], "malformed header (ValueError): not an augserve message"),
        ([msgpack.packb({1: 2})], "malformed header (ValueError): not an augserve message"),  # non-string keys
        ([msgpack.packb([1, 2, 3])], "malformed header: not an augserve message"),
        ([msgpack.packb({"proto": "other", "v": P.PROTOCOL_VERSION, "type": "ping"})], "malformed header: not an augserve message"),
        ([b"\xc4\x10abc"], "malformed header (ValueError): not an augserve message"),  # 16-byte bin, 3 bytes sent
    ],
)
def test_truncated_and_garbage_frames_are_refused(frames, message):
    assert refused(frames) == message


def test_oversized_header_is_refused_before_parsing():
    frames = [b"\x00" * (P.MAX_HEADER_BYTES + 1)]
    assert refused(frames) == f"header of {P.MAX_HEADER_BYTES + 1} bytes exceeds the {P.MAX_HEADER_BYTES}-byte limit"


def test_unsupported_tensor_dtype_is_refused():
    batch = SAMPLES["batch"].model_dump(mode="json")
    batch["tensors"][0]["dtype"] = "object"
    assert "bad 'batch' message: tensors.0.dtype = 'object': Input should be 'uint8'" in refused([header("batch", **batch)])
    with pytest.raises(ValueError, match="dtype object of tensor 'x' cannot travel on the wire"):
        P.describe("x", np.array([None]))


# --- tensors ----------------------------------------------------------------------------------------------


def test_batch_round_trip_with_tensors():
    message = P.decode([bytes(f) for f in P.encode(SAMPLES["batch"], [P.tensor_buffer(IMAGES), P.tensor_buffer(LABELS)])], P.WORKER_TO_CLIENT)
    tensors = P.frames_to_tensors(message.body.tensors, message.buffers)
    assert tensors["images"].dtype == torch.uint8 and tensors["images"].shape == (2, 4, 5, 3)
    assert torch.equal(tensors["images"], torch.from_numpy(IMAGES))
    assert tensors["labels"].dtype == torch.int64 and tensors["labels"].tolist() == [3, 7]


def test_tensor_buffer_is_a_view_of_the_array():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    buffer = P.tensor_buffer(array)
    assert np.frombuffer(buffer, dtype=np.uint8).ctypes.data == array.ctypes.data
    tensor = torch.arange(6, dtype=torch.int32)
    assert np.frombuffer(P.tensor_buffer(tensor), dtype=np.uint8).ctypes.data == tensor.data_ptr()


def test_received_frames_are_wrapped_without_copy():
    buffer = bytearray(np.arange(12, dtype=np.float32).tobytes())
    descriptor = P.TensorDescriptor(name="x", dtype="float32", shape=[3, 4])
    tensors = P.frames_to_tensors([descriptor], [buffer])
    buffer[0:4] = np.float32(42).tobytes()
    assert tensors["x"][0, 0].item() == 42.0  # the tensor is a view of the received bytes
    frozen = bytes(range(12))  # read-only, like a zmq frame
    wrapped = P.frames_to_tensors([P.TensorDescriptor(name="y", dtype="uint8", shape=[12])], [frozen])["y"]
    assert wrapped.data_ptr() == np.frombuffer(frozen, dtype=np.uint8).ctypes.data


def test_zmq_frames_are_wrapped_without_copy():
    zmq = pytest.importorskip("zmq")
    frame = zmq.Frame(np.arange(8, dtype=np.int16).tobytes())
    tensor = P.frames_to_tensors([P.TensorDescriptor(name="z", dtype="int16", shape=[2, 4])], [frame])["z"]
    assert tensor.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert tensor.data_ptr() == np.frombuffer(frame.buffer, dtype=np.uint8).ctypes.data


def test_bfloat16_travels_as_raw_words():
    x = torch.randn(3, 5).to(torch.bfloat16)
    body = P.BatchHeader(stream="s", task="t", epoch=0, index=0, pipeline_version=1, worker="w", tensors=[P.describe("x", x)])
    assert body.tensors[0].dtype == "bfloat16"
    message = P.decode([bytes(f) for f in P.encode(body, [P.tensor_buffer(x)])])
    received = P.frames_to_tensors(message.body.tensors, message.buffers)["x"]
    assert received.dtype == torch.bfloat16 and torch.equal(received, x)


def test_empty_and_scalar_tensors():
    empty = np.zeros((0, 3), dtype=np.float16)
    assert P.tensor_buffer(empty) == b""
    out = P.frames_to_tensors([P.describe("e", empty)], [b""])["e"]
    assert out.shape == (0, 3) and out.dtype == torch.float16
    scalar = np.array(7, dtype=np.int32)
    out = P.frames_to_tensors([P.describe("s", scalar)], [P.tensor_buffer(scalar)])["s"]
    assert out.shape == () and out.item() == 7


def test_non_contiguous_arrays_are_made_contiguous():
    array = np.arange(24, dtype=np.uint8).reshape(4, 6)[:, ::2]
    out = P.frames_to_tensors([P.describe("a", array)], [P.tensor_buffer(array)])["a"]
    assert out.tolist() == array.tolist()


def test_frame_size_must_match_its_descriptor():
    x = P.TensorDescriptor(name="x", dtype="uint8", shape=[3, 4])
    with pytest.raises(P.ProtocolError, match=re.escape("tensor 'x': frame has 10 bytes, header says 12 (uint8 [3, 4])")):
        P.frames_to_tensors([x], [b"0123456789"])
    f = P.TensorDescriptor(name="f", dtype="float32", shape=[3])
    with pytest.raises(P.ProtocolError, match=re.escape("tensor 'f': frame has 13 bytes, header says 12 (float32 [3])")):
        P.frames_to_tensors([f], [b"0" * 13])
    with pytest.raises(P.ProtocolError, match="header describes 1 tensors but 0 frames arrived"):
        P.frames_to_tensors([x], [])
    with pytest.raises(P.ProtocolError, match="header describes 1 tensors but 2 frames arrived"):
        P.frames_to_tensors([x], [b"0" * 12, b""])


def test_cuda_tensors_must_be_copied_to_the_host_first():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    with pytest.raises(ValueError, match="only host tensors"):
        P.tensor_buffer(torch.zeros(2, device="cuda"))


# --- shared-memory descriptors ------------------------------------------------------------------------


def test_a_shm_batch_carries_no_frames():
    frames = P.encode(SAMPLES["shm_batch"], [b"x"])
    assert refused(frames) == "'shm_batch' message has 1 extra frame(s); at most 0 allowed"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("segment", "../../etc/passwd", "segment = '../../etc/passwd': String should match pattern"),
        ("segment", "augserve-slot-1-2-0123456789abcdef/x", "String should match pattern"),
        ("segment", "/dev/shm/augserve-slot-1-2-0123456789abcdef", "String should match pattern"),
        ("generation", 0, "generation = 0: Input should be greater than or equal to 1"),
        ("generation", 1 << 63, "generation = 9223372036854775808: Input should be less than 9223372036854775808"),
        ("retired", ["x"] * 2, "retired.0 = 'x': String should match pattern"),
    ],
)
def test_a_bad_shm_descriptor_is_refused_naming_the_field(field, value, message):
    fields = SAMPLES["shm_batch"].model_dump(mode="json")
    fields[field] = value
    text = refused([header("shm_batch", **fields)])
    assert text.startswith("bad 'shm_batch' message: ") and message in text


def test_slot_tensor_offsets_are_bounded():
    fields = SAMPLES["shm_batch"].model_dump(mode="json")
    fields["tensors"][0]["offset"] = -64
    assert "tensors.0.offset = -64: Input should be greater than or equal to 0" in refused([header("shm_batch", **fields)])
    fields["tensors"][0]["offset"] = 1 << 40
    assert "tensors.0.offset = 1099511627776: Input should be less than 1099511627776" in refused([header("shm_batch", **fields)])


def test_a_host_description_is_bounded():
    fields = SAMPLES["attach"].model_dump(mode="json")
    fields["shm_host"]["boot"] = "not-a-boot-id"
    assert "shm_host.boot = 'not-a-boot-id': String should match pattern" in refused([header("attach", **fields)])
    fields = SAMPLES["task"].model_dump(mode="json")
    fields["handoff"]["slots"] = 0
    assert "handoff.slots = 0: Input should be greater than or equal to 1" in refused([header("task", **fields)])
    fields["handoff"]["slots"] = 1
    fields["handoff"]["mode"] = "frames"  # a task that allows no shared memory carries no handoff at all
    assert "handoff.mode = 'frames': Input should be 'auto' or 'shm'" in refused([header("task", **fields)])


def test_tensor_sizes_never_wrap_around():
    descriptor = P.TensorDescriptor(name="x", dtype="float64", shape=[1 << 39] * 8)
    assert P.tensor_layout(descriptor)[1] == (1 << (39 * 8)) * 8  # exact, not an int64 that wrapped to a small number


def test_a_credit_may_carry_the_trainers_wait_and_leaves_it_off_the_wire_otherwise():
    frames = P.encode(P.Credit(stream="s1", wait=P.Wait(batches=3, seconds=0.25)))
    assert msgpack.unpackb(frames[0])["wait"] == {"batches": 3, "seconds": 0.25}
    assert P.decode(frames).body.wait == P.Wait(batches=3, seconds=0.25)
    assert "wait" not in msgpack.unpackb(P.encode(P.Credit(stream="s1"))[0])  # what an older client sends
    assert P.decode(P.encode(P.Credit(stream="s1"))).body.wait is None


@pytest.mark.parametrize("wait", [{"batches": 0, "seconds": 1.0}, {"batches": 1, "seconds": -1.0}, {"batches": 1, "seconds": 1e7}, {"batches": 1, "seconds": 1.0, "x": 1}, {"batches": 1}])
def test_a_bad_wait_report_is_refused_naming_it(wait):
    header = {"proto": "augserve", "v": P.PROTOCOL_VERSION, "type": "credit", "stream": "s1", "wait": wait}
    with pytest.raises(P.ProtocolError, match="wait"):
        P.decode([msgpack.packb(header)])
