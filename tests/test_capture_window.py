"""The capture connection over tcp keeps flowing after its queue filled
(issue 26). With its 16 KiB kernel buffers (BUS_CAPTURE_BUFFER_BYTES), the
receive window could not hold one segment of loopback's 64 KiB MTU: once the
writer had paused, the proxy's kernel sent the rest only on its zero-window
probe timer, 200 ms and backing off. The bus then stored a few hundred
messages a second for seconds to minutes, its processes idle (bench runs at
40,000 msg/s stalled 1.5 to 198 s). The writer's end now announces segments
that window holds (sockets.capture_max_segment). The bus's own capture
sockets, made with the default settings, are driven here as the proxy and a
pausing writer drive them."""

from __future__ import annotations

import os
import threading
import time

import zmq

from bus import sockets
from bus.config import load_config
from tests.conftest import free_port

MESSAGES = 50_000
PAUSE_EVERY, PAUSE_S = 5_000, 0.05  # the writer busy with a slow commit, now and then
# Longer than any pause of the reader's own or of a loaded machine's scheduler
# seen here, shorter than the kernel's first zero-window probe (200 ms).
GAP_S = 0.15


def test_the_capture_over_tcp_flows_on_after_the_writer_paused() -> None:
    cfg = load_config(env={"BUS_CAPTURE_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
                           "BUS_CONFIG": os.devnull})
    ctx = zmq.Context()
    try:
        writer = sockets.open_writer_capture(ctx, cfg)
        proxy = sockets.open_proxy_capture(ctx, cfg)
        frames = [b"bench.capture", os.urandom(100), os.urandom(80)]
        sender = threading.Thread(
            target=lambda: [proxy.send_multipart(frames) for _ in range(MESSAGES)], daemon=True)
        sender.start()
        gaps, received, last = [], 0, time.monotonic()
        deadline = last + 20  # healthy: about 1 s; stalled: minutes
        while received < MESSAGES and time.monotonic() < deadline:
            if not writer.poll(1000):
                continue
            writer.recv_multipart()
            received += 1
            now = time.monotonic()
            if now - last > GAP_S:
                gaps.append(round(now - last, 3))
            last = now
            if received % PAUSE_EVERY == 0:
                time.sleep(PAUSE_S)
                last = time.monotonic()
        assert received == MESSAGES
        assert len(gaps) < 3, f"the capture stalled {len(gaps)} times: {gaps[:10]} s"
    finally:
        ctx.destroy(linger=0)
