"""Named scratch tensors reused across the calls of one inference path.

On the CPU a fresh tensor above glibc's mmap threshold (at most 32 MiB, often far less after a trim) is mapped anew and
page-faulted on every call: at a 128x128 Stable Diffusion latent AgentSD's scratch tensors are 8-38 MB each and their
faults cost 5-10% of the patched self-attention (measured: up to ~10,000 minor faults per call). A :class:`Workspace`
keeps such tensors between calls. It is only for tensors that never leave the call and never take part in autograd;
on other devices (which have caching allocators) it hands out fresh tensors.

This module imports only torch.
"""
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = ['Workspace', 'scratch']


class Workspace:
    """A dict of reusable CPU scratch tensors, one per name, reallocated only when shape, dtype or device change.

    Callers own the contract: a tensor from :meth:`get` is overwritten by the next ``get`` of the same name, so it must
    be dead by then (not returned to the user, not saved for backward). Slots are per thread, so one model called from
    two threads at once never shares scratch memory.
    """

    def __init__(self):
        self._buffers: Dict[Tuple[int, str], torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device (reused on the CPU).

        Args:
            name: Slot name; one tensor per name.
            shape: Wanted shape.
            like: Tensor whose dtype and device the result gets.

        Returns:
            The slot's tensor (CPU) or a fresh one (other devices).
        """
        shape = tuple(shape)
        if like.device.type != 'cpu':
            return like.new_empty(shape)
        key = (threading.get_ident(), name)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype:
            self._buffers.pop(key, None)  # free the old slot before allocating the new one
            buf = self._buffers[key] = like.new_empty(shape)
        return buf

    def slots(self) -> Dict[str, torch.Tensor]:
        """This thread's slots by name."""
        ident = threading.get_ident()
        return {name: t for (tid, name), t in self._buffers.items() if tid == ident}

    def clear(self) -> None:
        """Drop every slot of every thread (their memory goes back to the allocator)."""
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the slots of all threads."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def __repr__(self) -> str:
        return f'Workspace(slots={len(self._buffers)}, nbytes={self.nbytes})'


def scratch(workspace: Optional[Workspace], name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``workspace.get(name, shape, like)``, or a fresh uninitialised tensor when there is no workspace."""
    return like.new_empty(tuple(shape)) if workspace is None else workspace.get(name, shape, like)
