"""agent.grpc_wire against messages built by tritonclient's generated protobuf classes
(Triton's grpc_service.proto, a superset of KServe's): the name and version the agent reads,
the renamed message the server parses, the bool answers clients decode."""
from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from agent.grpc_wire import WireError, bool_message, name_and_version, with_name


def infer_request(name: str = "iris", version: str = "") -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=name, model_version=version, id="req-1")
    r.parameters["priority"].int64_param = 3
    r.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    r.raw_input_contents.append(np.arange(6, dtype=np.float32).tobytes())
    return r


@pytest.mark.parametrize("message", [
    infer_request("iris", "2"),
    pb.ModelReadyRequest(name="iris", version="2"),
    pb.ModelMetadataRequest(name="iris", version="2"),
    pb.ModelConfigRequest(name="iris", version="2"),
    pb.ModelStatisticsRequest(name="iris", version="2"),
])
def test_every_model_rpc_names_its_model_in_fields_1_and_2(message):
    assert name_and_version(message.SerializeToString()) == ("iris", "2")


def test_fields_in_any_order_and_the_last_name_wins():
    # tensors first, then the name: what a hand-rolled client may send
    tail_first = pb.ModelInferRequest(raw_input_contents=[b"\x00" * 300]).SerializeToString()
    body = tail_first + pb.ModelInferRequest(model_name="first").SerializeToString() \
        + pb.ModelInferRequest(model_name="second", model_version="7").SerializeToString()
    assert name_and_version(body) == ("second", "7")
    assert pb.ModelInferRequest.FromString(body).model_name == "second"  # protobuf agrees
    assert name_and_version(b"") == ("", "")


def test_with_name_renames_and_keeps_everything_else():
    original = infer_request("client-name", "1")
    renamed = pb.ModelInferRequest.FromString(with_name(original.SerializeToString(), "médèle-" + "x" * 200))
    assert renamed.model_name == "médèle-" + "x" * 200
    renamed.model_name = original.model_name
    assert renamed == original


def test_bool_answers():
    assert pb.ModelReadyResponse.FromString(bool_message(True)).ready is True
    assert pb.ServerLiveResponse.FromString(bool_message(True)).live is True
    assert pb.ServerReadyResponse.FromString(bool_message(False)).ready is False


@pytest.mark.parametrize("garbage", [b"\x0a\x05ab", b"\x0a", b"\x0b\x00", b"\x09\x00\x00", b"\x0a\x02\xff\xfe"])
def test_malformed_messages_are_refused(garbage):
    with pytest.raises(WireError):
        name_and_version(garbage)
