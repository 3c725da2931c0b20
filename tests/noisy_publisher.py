"""A noisy neighbour (issue 22, item 6): one publisher connection that sends
invalid messages as fast as it can, `python tests/noisy_publisher.py SECONDS
[KIND]` with the bus's settings in the environment.

Each message is three frames, a storable topic, a payload and a meta frame:
the proxy's subscriptions (the first bytes of storable topics) let it in, and
only the writer can tell that it is invalid. KIND `bad_meta` (the default): a
meta that is not msgpack (`meta_not_msgpack`). KIND `forged`: a well-formed
meta of a session this process opens (producer "noise") with a mac that is
not the session's, which passes validation and is dropped at the mac check
(`messages_not_authentic`). The socket is an XPUB without NODROP, as a plain PUB
is: it waits for the proxy's subscription, then never blocks (libzmq drops
at its high-water mark when the proxy does not read). It prints one line,
"noise {sent} {seconds}", when done.
"""

from __future__ import annotations

import sys
import time

import msgpack
import zmq

from bus import protocol, security
from bus.client import ControlClient
from bus.config import load_config

TOPIC = b"noise.t"
PAYLOAD = b"x" * 16
NOT_MSGPACK = b"\xc1"  # a byte msgpack never uses


def main() -> None:
    seconds = float(sys.argv[1])
    kind = sys.argv[2] if len(sys.argv) > 2 else "bad_meta"
    cfg = load_config()
    meta = NOT_MSGPACK
    if kind == "forged":
        with ControlClient(cfg.control_endpoint, curve=security.client_keys(cfg)) as control:
            epoch = control.request("producer_open", {"producer": "noise"})["epoch"]
        meta = msgpack.packb({protocol.META_PRODUCER: "noise", protocol.META_EPOCH: epoch,
                              protocol.META_SEQ: 1, protocol.META_MAC: bytes(protocol.MAC_BYTES)})
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    security.secure_client(sock, security.client_keys(cfg))
    sock.connect(cfg.pub_endpoint)
    if not sock.poll(15_000):  # the proxy's subscriptions: before them, a PUB sends nothing
        sys.exit("no subscription from the proxy")
    while sock.poll(0):
        sock.recv()
    send = sock.send
    more = zmq.SNDMORE
    sent = 0
    started = time.monotonic()
    deadline = started + seconds
    while True:
        for _ in range(1000):
            send(TOPIC, more)
            send(PAYLOAD, more)
            send(meta)
        sent += 1000
        if time.monotonic() >= deadline:
            break
    print(f"noise {sent} {time.monotonic() - started:.3f}", flush=True)
    sock.close()
    ctx.term()


if __name__ == "__main__":
    main()
