"""Many images over many processes: `torchrun --nproc_per_node=N test_FastDiffEM.py ...` (or any launcher that
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; several nodes work the same way).

Rank r takes the inputs r, r+N, r+2N, … and keeps each one's index in the whole list (the index seeds the
image's noise, so a sharded run gives the images of a single-process run). Each rank writes its own rows to
`metrics.rank<r>.csv`; after a barrier rank 0 merges every row into `metrics.csv` (input order) and writes
`summary.json`. A resumed run, sharded or not, skips the images any of these files marks finished.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def indices(self, n: int) -> list:
        """This rank's share of n inputs (round robin: neighbours in a folder are often alike in cost)."""
        return list(range(self.rank, n, self.world))


def ranks_from_env(env=None) -> Ranks:
    """The launcher's ranks (torchrun's environment variables); one process when they are absent."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"RANK {rank} / WORLD_SIZE {world} from the environment do not fit together")
    return Ranks(rank=rank, world=world, local_rank=int(env.get("LOCAL_RANK", str(rank))))


def start(ranks: Ranks, device: torch.device) -> None:
    """Join the process group with torch's default backend for the device (gloo on CPU); nothing for one process."""
    if ranks.sharded and not dist.is_initialized():
        dist.init_process_group(dist.get_default_backend_for_device(device))


def barrier(ranks: Ranks) -> None:
    if ranks.sharded:
        dist.barrier()


def stop(ranks: Ranks) -> None:
    if ranks.sharded and dist.is_initialized():
        dist.destroy_process_group()
