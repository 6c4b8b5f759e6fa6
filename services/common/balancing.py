"""Client-side load balancing of the gRPC channels to the services' replicas.

Every client address setting is a gRPC target: one host:port, several hosts
(`ipv4:127.0.0.1:50051,127.0.0.1:50061`) or a name that resolves to several addresses
(`dns:///writer.internal:50051`). The channel's load-balancing policy spreads the calls:
round_robin keeps a connection to every address and sends each call to the next ready one
(an address that stopped answering is skipped until it answers again); pick_first sends
everything to the first address that answers.
"""

import json
from typing import Any, Literal

LbPolicy = Literal["round_robin", "pick_first"]

LB_POLICY_DESCRIPTION = ("gRPC load-balancing policy over the addresses the target names: "
                         "round_robin (each call to the next ready replica) or pick_first.")


def service_config(policy: LbPolicy, **fields: Any) -> str:
    """The channel's service config: the policy, plus any other fields (methodConfig)."""
    return json.dumps({"loadBalancingConfig": [{policy: {}}], **fields})


def balancing_options(policy: LbPolicy) -> list[tuple[str, str]]:
    """Channel options that select `policy`."""
    return [("grpc.service_config", service_config(policy))]
