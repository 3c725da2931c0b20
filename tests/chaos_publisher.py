"""A publisher process for the kill -9 loop (tests/test_faults.py), restarted
as systemd would restart a service: `python tests/chaos_publisher.py INCARNATION`
with the bus's settings in the environment.

It publishes "INCARNATION-N" (N = 1, 2, ...) as producer "chaos" in windows of
WINDOW messages and prints "acked INCARNATION N" once everything up to N is
acknowledged. Everything is retried (the session, each flush): the test kills
the writer, the proxy and this process itself at random.
"""

from __future__ import annotations

import sys
import time

from bus.client import BusError, BusTimeout, Publisher

WINDOW = 200


def main() -> None:
    incarnation = int(sys.argv[1])
    while True:  # a session needs the writer and the proxy, which may be restarting
        try:
            pub = Publisher(producer_id="chaos", resend_after=0.3, connect_timeout=2.0).connect()
            break
        except BusTimeout:
            time.sleep(0.1)
    sent = 0
    while True:
        for _ in range(WINDOW):
            sent += 1
            pub.publish("chaos.t", f"{incarnation}-{sent}".encode())
        while True:
            try:
                pub.flush(timeout=2.0)
                break
            except BusTimeout:
                continue
            except BusError as exc:  # refused or fenced: nothing here should be
                print(f"error {exc.code} {exc}", flush=True)
                raise
        print(f"acked {incarnation} {sent}", flush=True)


if __name__ == "__main__":
    main()
