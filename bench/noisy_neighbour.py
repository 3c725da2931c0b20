"""One noisy publisher against an honest one (issue 22, item 6); not a test.

Starts a bus (writer, proxy, reader) on free loopback ports, then, for
--seconds each: an honest Publisher alone at --rate messages a second, and the
same while another process floods invalid messages (3 frames, a meta that is
not msgpack) on one publisher connection as fast as it can
(tests/noisy_publisher.py). Prints the honest acknowledgement latency (publish
to the acknowledgement that covers it) p50/p99/p99.9/max in ms, each
process's peak RSS during the flood (sampled every 20 ms), the
acknowledgements later than 5 s or never seen, the rate the noise was offered
at and the rate the writer refused it at. tests/test_fairness.py runs the same
shape (tests/fuzz.noisy_neighbour) and asserts the bound.

    python bench/noisy_neighbour.py [--seconds 20] [--rate 50] [--kind forged] [--ipc-capture]
                                    [--env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fuzz import RssSampler, noisy_neighbour, rss_kib  # noqa: E402
from tests.conftest import Bus  # noqa: E402


ROLES = ("writer", "proxy", "reader")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=50.0, help="honest messages a second")
    parser.add_argument("--kind", choices=("bad_meta", "forged"), default="bad_meta",
                        help="the noise: metas that are not msgpack, or a session's messages "
                             "with wrong macs")
    parser.add_argument("--ipc-capture", action="store_true",
                        help="the capture over ipc, as deploy/bus.toml has it")
    parser.add_argument("--env", action="append", default=[],
                        help="a bus setting, NAME=VALUE (e.g. BUS_CAPTURE_HWM=1000000)")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="bus-noisy-") as tmp:
        if args.ipc_capture:
            os.chmod(tmp, 0o700)
            settings["BUS_CAPTURE_ENDPOINT"] = f"ipc://{tmp}/capture.sock"
        bus = Bus(Path(tmp), **settings).start()
        try:
            quiet = noisy_neighbour(bus, args.seconds, args.rate, noise=False)
            before = {role: rss_kib(getattr(bus, role).pid) for role in ROLES}
            sampler = RssSampler({role: getattr(bus, role).pid for role in ROLES},
                                 interval=0.02)
            try:
                noisy = noisy_neighbour(bus, args.seconds, args.rate, kind=args.kind)
            finally:
                sampler.stop()
        finally:
            bus.close()
    print(f"noisy neighbour ({args.kind}), {args.seconds:g} s each, honest {args.rate:g} msg/s, "
          f"capture over "
          f"{'ipc' if args.ipc_capture else 'tcp'}, {platform.machine()}, {os.cpu_count()} "
          f"cores, Python {platform.python_version()}" +
          (f", {' '.join(args.env)}" if args.env else ""))
    print(f"{'':14} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} {'>5 s':>5} "
          f"{'noise sent/s':>13} {'refused/s':>10}")
    for name, result in (("alone", quiet), ("noisy", noisy)):
        ms = result["honest_ms"]
        print(f"{name:14} {ms['p50']:8.1f} {ms['p99']:8.1f} {ms['p99.9']:9.1f} {ms['max']:8.1f} "
              f"{result['honest_timeouts']:5d} {result['noise_sent_per_s']:13,} "
              f"{result['noise_refused_per_s']:10,}")
    print("RSS before / peak during the flood (MB): " + ", ".join(
        f"{role} {before[role] / 1024:.0f} / {sampler.peak[role] / 1024:.0f}" for role in ROLES))
    print(f"honest stored (rows, distinct seqs): {noisy['honest_stored']}; "
          f"refused by reason: {noisy['writer_rejected']}, not authentic: "
          f"{noisy['writer_not_authentic']}")


if __name__ == "__main__":
    main()
