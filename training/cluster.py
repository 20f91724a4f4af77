"""Several machines in one build (`recsys build --nnodes M --node-rank R
--rdzv-endpoint HOST:PORT`): what every node's torchrun launcher needs to meet the others."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    """Several machines in one build: `nnodes` torchrun launchers meet at `endpoint`
    (HOST:PORT, c10d rendezvous); node 0 runs the build and its rank 0 writes the model;
    the others only train their ranks, reading what node 0 names from a filesystem every
    node mounts."""

    nnodes: int
    node_rank: int
    endpoint: str
    timeout_seconds: float = 600.0  # to meet, and for any one collective

    def torchrun_arguments(self) -> list[str]:
        return [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-conf=join_timeout={int(self.timeout_seconds)}",
        ]
