"""Delete RabbitMQ queues left behind by interrupted test or benchmark runs.

Test runs name their queues with a private prefix (``t<run>.``, ``t<run>e2e.``,
``bench<run>.``, ``kit<run>.``) and delete them when they finish; a run that was killed
cannot. Quorum queues are Raft groups, and a few hundred forgotten ones make a small
broker unresponsive, so CI sweeps before testing. Best effort: needs ``rabbitmqctl``
(root on the broker's machine); without it, it says so and does nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

LEFTOVER = re.compile(r"^(t[0-9a-f]{8}[a-z0-9]*|bench[0-9a-f]{8}|kit[0-9a-f]{6})\.")


def main() -> int:
    """List queues, delete the leftovers, report how many."""
    if shutil.which("rabbitmqctl") is None:
        print("sweep: rabbitmqctl not found; skipped")
        return 0
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if listed.returncode != 0:
        print(f"sweep: cannot list queues: {listed.stderr.strip()[:200]}", file=sys.stderr)
        return 0
    names = [n for n in listed.stdout.split() if LEFTOVER.match(n)]
    for name in names:
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_queue", name],
            capture_output=True,
            timeout=60,
            check=False,
        )
    print(f"sweep: deleted {len(names)} leftover test queues")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
