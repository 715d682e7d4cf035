"""The Ray Serve settings ArtServe runs under: environment variables that must reach every Ray
process (controller, proxies, replicas) before it starts, so they are set where Ray starts —
`python -m serve_app run`, the image (Dockerfile `ENV`), the RayService pods, the tests'
Serve instances and the benchmarks'. An operator's own value of any of them wins.

Four parts of Ray Serve 2.60's `RAY_SERVE_THROUGHPUT_OPTIMIZED` bundle, measured on the
HTTP path of a 1-step request (benchmarks/README.md, "http_path.py": ≈ 9 ms less of it, the
proxy's part ≈ 6 of them): the proxy and handles call replicas over gRPC instead of Ray actor
calls, the replicas run our code on the event loop that serves those calls (no hop to a second
thread's loop, each way), handles route on that loop too, and the garbage collector's
generations are frozen once a replica is up (the pipeline's many objects are not rescanned by
every collection). gRPC alone or the loops alone measured no gain: together they do. gRPC's
message bound (4 MiB by default, on both ends) is lifted: a response of several large base64
images, or a job carrying a large edit upload, is one message. Under gRPC the handles' count of
ongoing requests, which the autoscaler reads by default, came out low (a model downscaled at
"1.00 ongoing" with four requests in flight: tests/integration/test_autoscaling.py failed), so
the replicas report their own count instead (`RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE=0`,
Serve's earlier default). Left out of the bundle, on purpose:

- direct ingress (no proxies; the ingress replicas listen themselves): the RayService's Kubernetes
  Service, the per-node proxies the multi-node tests rely on and `proxy_location` need the proxies;
- replica logs off stderr: operators read there why a request or a LoRA file was refused.

With user code on the replica's loop a handler must not block it: ArtServe's replicas hand
every blocking part (the step loop, encoding, storage) to threads already.

Where Ray starts, SIGINT must also reach `serve run`: see `let_children_take_ctrl_c`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

RAY_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),  # gRPC's largest
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
    "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0",
}


def with_ray_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with ArtServe's Ray settings where it has none."""
    return {**RAY_ENV, **(os.environ if env is None else env)}


def let_children_take_ctrl_c() -> None:
    """Call before starting a `serve run` that is stopped with SIGINT (its Ctrl-C). A shell's
    background job (`cmd &`, `nohup`) starts with SIGINT ignored, and an ignored signal stays
    ignored across exec: such a `serve run` never stops on SIGINT (the launcher killed it after
    its 60 s grace; each benchmark server sat out its 150 s). A caught signal is reset to the
    default on exec, so catching SIGINT here, as Python does when it starts with it unignored,
    gives every child started afterwards a working Ctrl-C."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
