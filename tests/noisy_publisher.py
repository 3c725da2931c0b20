"""A noisy neighbour (issue 22, item 6): one publisher connection that sends
invalid messages as fast as it can, `python tests/noisy_publisher.py SECONDS`
with the bus's settings in the environment.

Each message is three frames, a storable topic, a payload and a meta frame
that is not msgpack: the proxy's subscriptions (the first bytes of storable
topics) let it in, and only the writer can tell that it is invalid
(`meta_not_msgpack`). The socket is an XPUB without NODROP, as a plain PUB
is: it waits for the proxy's subscription, then never blocks (libzmq drops
at its high-water mark when the proxy does not read). It prints one line,
"noise {sent} {seconds}", when done.
"""

from __future__ import annotations

import sys
import time

import zmq

from bus import security
from bus.config import load_config

TOPIC = b"noise.t"
PAYLOAD = b"x" * 16
NOT_MSGPACK = b"\xc1"  # a byte msgpack never uses


def main() -> None:
    seconds = float(sys.argv[1])
    cfg = load_config()
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
            send(NOT_MSGPACK)
        sent += 1000
        if time.monotonic() >= deadline:
            break
    print(f"noise {sent} {time.monotonic() - started:.3f}", flush=True)
    sock.close()
    ctx.term()


if __name__ == "__main__":
    main()
