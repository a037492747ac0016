"""The README's examples run exactly as written against the running system.

Only the addresses (ports), the API key and the certificate directory are substituted,
because the suite runs on free ports next to a possible ``make run``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from scripts.system import ROOT
from tests.e2e_support import API_KEY, E2E


def _examples() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- examples:start -->", 1)[1].split("<!-- examples:end -->", 1)[0]
    return "\n".join(re.findall(r"```sh\n(.*?)```", block, flags=re.S))


async def test_readme_examples_work_every_time_they_are_pasted(e2e: E2E, certs_dir: Path) -> None:
    script = (
        _examples()
        .replace("localhost:8080", f"localhost:{e2e.cfg.ports.http}")
        .replace("localhost:50051", f"localhost:{e2e.cfg.ports.gateway}")
        .replace("localhost:50052", f"localhost:{e2e.cfg.ports.user_svc}")
        .replace("gen/descriptor.binpb", f"{ROOT / 'gen' / 'descriptor.binpb'}")
        .replace("localhost:50054", f"localhost:{e2e.cfg.ports.email_worker}")
        .replace("notify-dev-key", API_KEY)
        .replace("var/certs/", f"{certs_dir}/")
    )
    assert "curl" in script and "grpcurl" in script
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for _ in range(2):  # a second paste must not trip over what the first created
        out = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "notify.v1.NotificationService" in out.stdout
        assert '"status": "SERVING"' in out.stdout
        assert '"channel": "email"' in out.stdout  # the worker's provider status
