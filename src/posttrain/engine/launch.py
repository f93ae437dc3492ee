"""torchrun for one node with nothing listening beyond 127.0.0.1.

torchrun's static rendezvous starts a c10d ``TCPStore`` server whose socket binds every
interface (``*:29500``), whatever ``--master-addr`` says: on a shared or cloud machine anyone who
reaches the port can read and write the store the ranks trust. One node needs no outside peer, so
``posttrain launch`` runs torchrun through this module, which registers the rendezvous backend
``posttrain-local``: the same static rendezvous (one node, rank 0, the agent's store shared with
the workers), with its store listening on a socket bound to 127.0.0.1 beforehand (``TCPStore``'s
``master_listen_fd``). Gloo and NCCL are pointed at the loopback interface too, unless the user
chose one. Several nodes keep torchrun's own static rendezvous (the peers must reach it).

    python -m posttrain.engine.launch [torchrun arguments]   # what `posttrain launch` runs
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

BACKEND = "posttrain-local"
LOOPBACK = "127.0.0.1"


def torchrun_command(nproc: int, nnodes: str, node_rank: str, master_addr: str, master_port: str,
                     target: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a launch of ``target`` (``["-m", "posttrain", stage, ...]``).

    ``nnodes`` as torchrun takes it ("2", or "1:4" for elastic); one node ("1") ignores
    ``master_addr`` and ``node_rank``, and ``master_port`` 0 picks a free port."""
    if str(nnodes) == "1":
        cmd = [sys.executable, "-m", "posttrain.engine.launch", f"--nproc_per_node={nproc}", "--nnodes=1",
               f"--rdzv-backend={BACKEND}", f"--rdzv-endpoint={LOOPBACK}:{master_port}"]
        env = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", **os.environ}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
               f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}"]
        env = dict(os.environ)
    return cmd + target, env


def _handler(params):
    from torch.distributed import PrefixStore, TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousInfo
    from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    host, port = parse_rendezvous_endpoint(params.endpoint, 29500)
    if host not in (LOOPBACK, "localhost") or params.max_nodes != 1:
        raise ValueError(f"rendezvous backend {BACKEND!r} is for one node on {LOOPBACK}; got endpoint "
                         f"{params.endpoint!r} and nnodes={params.min_nodes}:{params.max_nodes}")
    timeout = datetime.timedelta(seconds=int(params.config.get("timeout", 900)))

    class LocalRendezvous(RendezvousHandler):
        """One node, rank 0, its store on a socket bound to 127.0.0.1 (port 0: any free one)."""

        def __init__(self):
            self._listener = None
            self._store = None

        def get_backend(self) -> str:
            return BACKEND

        @property
        def use_agent_store(self) -> bool:  # the workers use our store instead of opening their own
            return True

        def next_rendezvous(self):
            if self._store is None:
                self._listener = socket.create_server((LOOPBACK, port), backlog=128)
                bound = self._listener.getsockname()[1]
                self._store = TCPStore(LOOPBACK, bound, 1, True, timeout, multi_tenant=True,
                                       master_listen_fd=self._listener.fileno())
            bound = self._listener.getsockname()[1]
            return RendezvousInfo(PrefixStore(params.run_id, self._store), 0, 1, RendezvousStoreInfo(LOOPBACK, bound))

        def is_closed(self) -> bool:
            return False

        def set_closed(self) -> None:
            pass

        def num_nodes_waiting(self) -> int:
            return 0

        def get_run_id(self) -> str:
            return params.run_id

        def shutdown(self) -> bool:
            if self._listener is not None:
                self._listener.close()
            return True

    return LocalRendezvous()


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.run import main as torchrun

    rendezvous_handler_registry.register(BACKEND, _handler)
    torchrun(argv)


if __name__ == "__main__":
    main()
