"""The engine-core process: builds the EngineCore, then loops: take commands, step, send outputs.

Started by MPCoreClient (engine/core/client.py) as `python -m omnistream.engine.core.process` in its own
session (so the terminal's Ctrl-C and a process-group SIGTERM reach the front end only, which then shuts
the core down in order), with the EngineConfig as JSON on stdin. It connects a PULL socket (commands) and a
PUSH socket (events) to the front end's `ipc://` endpoints in a private runtime directory; every message is
a msgspec Struct in msgpack (engine/core/messages.py). It watches a pipe from the front end: if the front end
dies the pipe reaches EOF and the core exits, so no engine outlives its server. A failing step sends `Died`
and exits non-zero (its TP workers go down with its executor).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

import msgspec
import zmq

from omnistream.engine.core.engine_core import EngineCore
from omnistream.engine.core.messages import Call, Died, Outputs, Reply, StartupFailed
from omnistream.engine.core.service import CoreService
from omnistream.engine.engine_config import EngineConfig

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # how long an idle core sleeps in poll before looking again (commands wake it at once)


def main() -> None:
    parser = argparse.ArgumentParser(description="omnistream engine core (started by the front end)")
    parser.add_argument("--commands", required=True, help="ipc:// address of the front end's command socket")
    parser.add_argument("--events", required=True, help="ipc:// address of the front end's event socket")
    parser.add_argument("--lifeline-fd", type=int, required=True, help="read end of a pipe the front end holds")
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_engine_core(sys.stdin.buffer.read(), args.commands, args.events, args.lifeline_fd)


def run_engine_core(config_json: bytes, command_address: str, event_address: str, lifeline_fd: int) -> None:
    """Serve the front end until Shutdown, its death (EOF on `lifeline_fd`), or a failure."""
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    events = context.socket(zmq.PUSH)
    for socket in (commands, events):
        socket.setsockopt(zmq.LINGER, 5000)  # let the last events (Died, final outputs) leave before exit
    commands.connect(command_address)
    events.connect(event_address)
    encoder = msgspec.msgpack.Encoder()
    service = None
    try:
        try:
            config = msgspec.json.decode(config_json, type=EngineConfig)
            service = CoreService(EngineCore(config))
        except BaseException as exc:  # noqa: BLE001 - the front end raises it for its caller
            events.send(encoder.encode(StartupFailed(error_type=type(exc).__name__, message=str(exc))))
            raise SystemExit(1) from None
        events.send(encoder.encode(service.ready()))
        _serve(service, commands, events, lifeline_fd, encoder)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported, then the process exits non-zero
        logger.error("engine core failed:\n%s", traceback.format_exc())
        events.send(encoder.encode(Died(message=f"{type(exc).__name__}: {exc}")))
        raise SystemExit(1) from None
    finally:
        if service is not None:
            service.engine.shutdown()
        commands.close(linger=0)
        events.close()
        context.term()


def _serve(
    service: CoreService, commands: zmq.Socket, events: zmq.Socket, lifeline_fd: int, encoder: msgspec.msgpack.Encoder,
) -> None:
    decoder = msgspec.msgpack.Decoder(Call)
    poller = zmq.Poller()
    poller.register(commands, zmq.POLLIN)
    poller.register(lifeline_fd, zmq.POLLIN)
    while not service.stopping:
        ready = dict(poller.poll(0 if service.has_work() else IDLE_POLL_MS))
        if lifeline_fd in ready:  # EOF (nobody ever writes): the front end is gone
            logger.warning("the front end went away; the engine core stops (pid %d)", os.getpid())
            return
        while not service.stopping:
            try:
                frame = commands.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            _handle(service, decoder.decode(frame), events, encoder)
        outputs = service.step()
        if outputs:
            events.send(encoder.encode(Outputs(outputs=outputs)))


def _handle(service: CoreService, call: Call, events: zmq.Socket, encoder: msgspec.msgpack.Encoder) -> None:
    try:
        value = service.apply(call.command)
    except Exception as exc:  # noqa: BLE001 - a command's failure is its caller's, not the engine's
        if call.call_id:
            events.send(encoder.encode(Reply(call_id=call.call_id, error_type=type(exc).__name__, message=str(exc))))
        else:
            logger.warning("engine-core command %s failed: %s", type(call.command).__name__, exc)
        return
    if call.call_id:
        events.send(encoder.encode(Reply(call_id=call.call_id, value=value)))


if __name__ == "__main__":
    main()
