"""What every client of the gateway shares: the default address, message limits, a channel
and the response -> dict conversion (JSON-ready, field names as in the proto)."""

from __future__ import annotations

import grpc
from google.protobuf.json_format import MessageToDict

DEFAULT_SERVER = "localhost:50051"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def open_channel(server: str = DEFAULT_SERVER) -> grpc.Channel:
    return grpc.insecure_channel(server, options=list(CHANNEL_OPTIONS))


def response_to_dict(response) -> dict:
    return MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
