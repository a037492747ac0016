"""The test suite.

The suite's own process keeps gRPC channels open while it starts the services as
subprocesses. With gRPC's fork support on, the forked child restarts gRPC's poller
before it execs, ``subprocess`` closes the poller's epoll descriptor, and the child
aborts (SIGABRT) before it becomes the service: grpc/grpc#43055, seen once in CI as
"push_worker exited with -6 ... epoll_wait error: Bad file descriptor". Nothing here
uses gRPC in a forked child, so fork support is off for the suite's process, set before
anything imports grpc (the package is imported before its conftest), as the launcher
already does for the services (``scripts.system``) and the image (Dockerfile).
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
