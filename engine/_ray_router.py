"""Ray Serve request router for engine.cluster (imported by Ray's proxy and handles; needs ray).

Ray's default router prefers replicas on the proxy's own node and compares two sampled replicas.
A conversation holds its replica's slot for minutes, so both are wrong here: a proxy would fill its
local replica while another node has free slots, and with more than two replicas a request could
sample two full ones. This router ranks every replica together: Ray's request router then sends
the request to the one with the fewest ongoing requests (its cached or probed queue length), so a
new conversation lands on a replica with free session slots whenever one has them.
"""
from __future__ import annotations

import random
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class LeastSessionsRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        # one rank holding every replica (shuffled: ties go to any of them)
        return [random.sample(list(candidate_replicas), len(candidate_replicas))]
