"""Deliver named tensors one at a time, point to point, from the ranks that hold their parts to the ranks that
ask for them.

A model sharded over TP x PP x DP ranks holds each canonical tensor in parts (one per TP rank, on the ranks of
one pipeline stage, repeated on every DP replica). Saving a checkpoint needs every tensor on one rank; pruning
needs, on each rank, the tensors its new shard is cut from. Gathering whole models for that costs a model's
worth of memory per rank; :meth:`Exchange.deliver` instead walks a list of names in one order on every rank and,
for each name, sends its parts from one holder each (the lowest global rank that holds it) to the ranks that want
it, so a rank holds its own shard plus one tensor in flight. Only the names, part shapes and who wants what are
shared up front (two small ``all_gather_object`` calls); ranks that neither hold nor want a name skip it.

Every rank must run ``deliver`` with the same names in the same order (it is a collective), and exhaust it.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import torch
import torch.distributed as dist

from nemo_minitron.parallel.cpu import cuda_available


class Part(NamedTuple):
    """One part of a named tensor: its index among the tensor's parts, the number of parts, and its value."""

    index: int
    count: int
    tensor: torch.Tensor


class _Source(NamedTuple):
    owner: int  # the global rank that sends this part
    shape: tuple[int, ...]
    dtype: torch.dtype


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_object(obj) -> list:
    rank, world = _world()
    if world == 1:
        return [obj]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, obj)
    return everyone


class Exchange:
    """The tensors this rank holds (``held``: name -> :class:`Part`), deliverable to any rank (a collective:
    every rank builds one, in the same order relative to other collectives)."""

    def __init__(self, held: dict[str, Part]) -> None:
        self.rank, _ = _world()
        self.held = held
        table = _all_gather_object([(name, p.index, p.count, tuple(p.tensor.shape), p.tensor.dtype)
                                    for name, p in held.items()])
        self.sources: dict[str, list[_Source]] = {}
        self.holders: dict[tuple[str, int], set[int]] = {}
        for rank, entries in enumerate(table):
            for name, index, count, shape, dtype in entries:
                parts = self.sources.setdefault(name, [None] * count)  # type: ignore[list-item]
                if parts[index] is None:  # the lowest rank holding a part sends it
                    parts[index] = _Source(rank, shape, dtype)
                self.holders.setdefault((name, index), set()).add(rank)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype of the tensor ``name`` as its holders keep it."""
        return self.sources[name][0].dtype

    def deliver(self, names: list[str], wanted: Iterable[str]) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """For each of ``names`` in order (the same list on every rank), its parts (in index order, on the CPU)
        on the ranks that list it in ``wanted``; yields ``(name, parts)`` on those ranks only. Parts this rank
        holds itself are its own tensors, not copies: read them, do not change them."""
        mine = set(wanted)
        requesters: dict[str, list[int]] = {}
        for rank, asked in enumerate(_all_gather_object(sorted(mine))):
            for name in asked:
                requesters.setdefault(name, []).append(rank)
        missing = sorted(n for n in requesters if n not in self.sources or None in self.sources[n])
        if missing:
            raise RuntimeError(f"no rank holds {missing[0]}")
        device = torch.device("cuda") if cuda_available() else torch.device("cpu")
        for name in names:
            asking = requesters.get(name, [])
            if not asking:
                continue
            pending, parts = [], []
            for index, source in enumerate(self.sources[name]):
                holders = self.holders[(name, index)]
                if source.owner == self.rank:
                    data = self.held[name].tensor.detach().to(device).contiguous()
                    pending += [dist.isend(data, dst) for dst in asking if dst not in holders]
                if name not in mine:
                    continue
                if self.rank in holders:
                    parts.append(self.held[name].tensor.detach())
                else:
                    buffer = torch.empty(source.shape, dtype=source.dtype, device=device)
                    pending.append(dist.irecv(buffer, source.owner))
                    parts.append(buffer)
            for request in pending:
                request.wait()
            if name in mine:
                yield name, [part.cpu() for part in parts]
