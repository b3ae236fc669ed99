"""A gRPC Session's request stream, fed from a test as the answers arrive."""

from __future__ import annotations

import queue
from collections.abc import Iterator

from omnistream.engine.grpc_gen import omnistream_pb2 as pb


class SessionInputs:
    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()

    def put(self, *messages: pb.SessionInput) -> None:
        for message in messages:
            self.queue.put(message)

    def close(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[pb.SessionInput]:
        return iter(self.queue.get, None)
