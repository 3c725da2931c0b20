"""A process that takes a port of the bus while the process that binds it is
away (tests/test_restarts.py): what any local user could run in the
RestartSec= window. Standard library only, so that it runs as another user
(`nobody`) with the system's python3.

    squatter.py bind PORT               bind 127.0.0.1:PORT once; print "bound"
                                        or "bind failed: ERRNO"; exit
    squatter.py null PORT SECONDS       listen on 127.0.0.1:PORT as a ZeroMQ
                                        listener of the NULL mechanism (no key,
                                        no authentication): print "bound", then
                                        "accepted" for each connection, and
                                        exit once SECONDS have passed and at
                                        least one peer came (at most
                                        SECONDS + 30 s)

A peer that expects a CURVE server fails its handshake on the NULL greeting
(libzmq: HANDSHAKE_FAILED_PROTOCOL, mechanism mismatch) and libzmq 4.3 never
connects that endpoint again.
"""

from __future__ import annotations

import socket
import sys
import time

# ZMTP 3.0's greeting: signature, version 3.0, mechanism "NULL" (20 bytes),
# as-server 0, filler: 64 bytes.
NULL_GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") \
    + b"\0" + b"\0" * 31
MAX_EXTRA_S = 30.0


def main(argv: list[str]) -> int:
    mode, port = argv[1], int(argv[2])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As a determined squatter would: connections of the process that was
    # killed may linger in TIME_WAIT on the port.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
        listener.listen(16)
    except OSError as exc:
        print(f"bind failed: {exc.errno}", flush=True)
        return 0
    print("bound", flush=True)
    if mode == "bind":
        listener.close()
        return 0
    seconds = float(argv[3])
    started = time.monotonic()
    listener.settimeout(0.05)
    peers = []
    while time.monotonic() - started < seconds + MAX_EXTRA_S:
        if peers and time.monotonic() - started >= seconds:
            break
        try:
            peer, _address = listener.accept()
        except (TimeoutError, socket.timeout):
            continue
        try:
            peer.sendall(NULL_GREETING)
        except OSError:
            pass
        peers.append(peer)
        print("accepted", flush=True)
    for peer in peers:
        peer.close()
    listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
