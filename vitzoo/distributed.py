"""torchrun set-up shared by the training and evaluation tools: process group, device, exact sums over ranks."""
import os
from typing import Any, Iterator, List, Sequence

import torch
import torch.distributed as dist
import torch.utils.data

__all__ = ['DistributedError', 'Distributed', 'ShardSampler']


class DistributedError(ValueError):
    """The torchrun launch does not fit the machine (e.g. more processes per node than GPUs)."""


class Distributed:
    """This process's place in a torchrun job (``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``); world 1 outside torchrun.

    Picks the device (CUDA: the local rank's GPU under torchrun; else CPU) and joins the process group (nccl on
    CUDA, gloo on CPU) unless one exists; :meth:`close` leaves only a group it created.

    Args:
        device: ``'cpu'``, ``'cuda'`` / ``'cuda:N'`` or ``''`` (CUDA if available).
    """

    def __init__(self, device: str = '') -> None:
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        self.local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        use_cuda = device.startswith('cuda') or (not device and torch.cuda.is_available())
        if use_cuda:
            if self.distributed:
                if self.local_rank >= torch.cuda.device_count():
                    raise DistributedError(
                        f'local rank {self.local_rank} but only {torch.cuda.device_count()} CUDA devices: use '
                        f'--nproc_per_node <= the GPU count (or --device cpu)')
                device = f'cuda:{self.local_rank}'
            self.device = torch.device(device or 'cuda')
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device('cpu')
        self.owns_group = False
        if self.distributed and not dist.is_initialized():
            dist.init_process_group('nccl' if use_cuda else 'gloo')
            self.owns_group = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum over ranks, in float64 (counts stay exact)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device if self.device.type == 'cuda' else 'cpu')
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def gather_lists(self, items: List[Any]) -> List[Any]:
        """The concatenation of every rank's ``items`` (rank order), on every rank."""
        if not self.distributed:
            return items
        out: List[List[Any]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sampler: rank r takes indices r, r + world, ... (no padding, so summed metrics are exact).

    ``DistributedSampler`` repeats samples to even out the shards, which would bias the counts; here the union over
    ranks is each index exactly once.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.idx = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)
