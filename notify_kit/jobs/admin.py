"""``WorkerAdminService``: what a worker's providers and consumer are doing, for operators.

Read-only, served next to health and reflection on the worker's port; the access matrix
lets only the operator certificate call it.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import duration_pb2
from notify.v1 import worker_admin_pb2, worker_admin_pb2_grpc

from notify_kit.breaker import State
from notify_kit.jobs.pause import Pause
from notify_kit.jobs.providers import ProviderChain

_STATES = {
    State.CLOSED: worker_admin_pb2.BREAKER_STATE_CLOSED,
    State.OPEN: worker_admin_pb2.BREAKER_STATE_OPEN,
    State.HALF_OPEN: worker_admin_pb2.BREAKER_STATE_HALF_OPEN,
}


class WorkerAdmin(worker_admin_pb2_grpc.WorkerAdminServiceServicer):
    """Answers from the live chain and pause: nothing is cached or copied."""

    def __init__(self, chain: ProviderChain[Any, Any], pause: Pause) -> None:
        self._chain = chain
        self._pause = pause

    async def GetProviderStatus(  # noqa: N802 (gRPC method name)
        self,
        request: worker_admin_pb2.GetProviderStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> worker_admin_pb2.GetProviderStatusResponse:
        """Each breaker in failover order, and whether the consumer runs."""
        providers = []
        for status in self._chain.status():
            retry_in = duration_pb2.Duration()
            retry_in.FromMilliseconds(int(status.retry_in * 1000))
            providers.append(
                worker_admin_pb2.ProviderStatus(
                    name=status.name.split("/", 1)[-1],
                    state=_STATES[status.state],
                    recent_failures=status.recent_failures,
                    last_failure=status.last_failure[:1000],
                    retry_in=retry_in,
                    transitions=status.transitions,
                )
            )
        return worker_admin_pb2.GetProviderStatusResponse(
            channel=self._chain.channel,
            consuming=not self._pause.paused,
            pause_reason=self._pause.reason if self._pause.paused else "",
            providers=providers,
        )
