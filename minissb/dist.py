"""Several processes under torchrun: who am I, my share of the work, and one merged result.

    torchrun --nproc_per_node 8 train.py ...     # data parallel over the LoRA parameters
    torchrun --nproc_per_node 8 sample.py ...    # problems sharded over ranks
    python train.py ...                          # one process: no process group, nothing changes

Read top to bottom:
  the process group  `setup(device)` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and joins
                     the group (nccl on CUDA, gloo on CPU), one GPU per rank; without torchrun it
                     returns a world of one and starts nothing. `World` carries rank and size.
  training           every rank computes the gradient of its slice of each global batch, with the
                     loss already weighted by the whole batch's token count, so one all-reduce
                     (a sum) of the LoRA gradients gives exactly the one-process gradient; the
                     AdamW step then runs identically on every rank (same state, same update).
                     That is what DDP does; for LoRA weights (a few MB) one flat all-reduce per
                     step is all it needs and leaves the model and its forward untouched.
                     `shard_base` (train.py --fsdp) adds FSDP2 for a base too big for one GPU:
                     the frozen layer weights are sharded, the LoRA weights stay whole.
  sample and eval    problem i of those not yet done belongs to rank i % world (every problem's
                     samples are seeded by the problem alone, so any split gives the same
                     records). Each rank appends its records to its own part file
                     (`pairs.rank1.jsonl`); a restart, at any world size, treats every record in
                     the output and in every part as done. At the end of a session each rank
                     leaves a done note, rank 0 waits for all of them and merges output and parts
                     in problem order into the output and deletes the parts, so the final file
                     is the same for any world size and for one process (which merges its own
                     file the same way). Nothing but the start is a collective.

Ranks share a filesystem (one machine, or a shared mount), as torchrun jobs usually do.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from minissb.runs import read_json, read_jsonl, write_json_atomic, write_jsonl_atomic


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> World:
    """The world torchrun describes in the environment (a world of one without torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0"))) if size > 1 else World()


def setup(device_name: str = "auto") -> tuple[World, str]:
    """Join torchrun's process group, if launched by it; returns the world and the device name
    this rank uses ("auto"/"cuda" become cuda:<local rank> so each rank gets its own GPU)."""
    world = launched()
    if not world.distributed:
        return world, device_name
    import torch
    import torch.distributed as dist

    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        device_name = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device_name)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    assert dist.get_rank() == world.rank and dist.get_world_size() == world.size, "torchrun's environment and the process group disagree"
    return world, device_name


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(world: World, tensors: Sequence) -> None:
    """Sum these tensors over all ranks, in place, in one flat all-reduce (they share a dtype)."""
    if not world.distributed or not tensors:
        return
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def sum_floats(world: World, values: Sequence[float]) -> list[float]:
    """Plain numbers (losses, token counts) summed over ranks, in float64."""
    if not world.distributed:
        return list(values)
    import torch

    t = torch.tensor(list(values), dtype=torch.float64)
    all_reduce_sum(world, [t])
    return t.tolist()


def sum_grads(world: World, params: Sequence) -> None:
    """Sum the gradients of `params` over ranks; a rank whose slice of the batch was empty
    (a last batch smaller than the world) takes part with zeros."""
    if not world.distributed:
        return
    import torch

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum(world, [p.grad for p in params])


def gather(world: World, items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (picklable items: e.g. the
    rollouts each rank sampled for its slice of a step's questions)."""
    if not world.distributed:
        return list(items)
    import torch.distributed as dist

    parts = [None] * world.size
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def shard_base(model, world: World, device) -> None:
    """FSDP2 for a base that does not fit one GPU (train.py --fsdp): each decoder layer's frozen
    weights are split over the ranks and gathered layer by layer in the forward and backward.
    The LoRA weights are left out of the sharding (ignored_params), whole on every rank, so
    their gradients are summed by sum_grads and their checkpoints written as without it. Every
    rank must then run the same number of forwards and backwards (optimizer_step pads)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from minissb.lora import lora_parameters

    assert world.distributed, "sharding needs torchrun with 2 or more processes"
    mesh = init_device_mesh(device.type, (world.size,))
    lora = set(lora_parameters(model))
    for layer in model.model.layers:  # the shards move to the mesh's device; the rest follows
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if p in lora})
    model.to(device)


def my_slice(items: Sequence, world: World) -> Sequence:
    """This rank's contiguous share of one global batch: sizes differ by at most one."""
    n, r, w = len(items), world.rank, world.size
    return items[r * n // w : (r + 1) * n // w]


# ----------------------------------------------------------------------------- part files


def part_path(path: str | os.PathLike, rank: int) -> Path:
    """Where rank `rank` appends its records: pairs.jsonl -> pairs.rank1.jsonl."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def part_files(path: str | os.PathLike) -> list[Path]:
    """The part files next to `path` that a run at any world size left, in rank order."""
    p = Path(path)
    pattern = re.compile(re.escape(p.stem) + r"\.rank(\d+)" + re.escape(p.suffix) + "$")
    found = [(int(m.group(1)), q) for q in p.parent.glob(f"{p.stem}.rank*{p.suffix}") if (m := pattern.match(q.name))]
    return [q for _, q in sorted(found)]


def write_path(path: str | os.PathLike, world: World) -> Path:
    """The file this process appends to: the output itself in one process, its part under torchrun."""
    return part_path(path, world.rank) if world.distributed else Path(path)


def read_all(path: str | os.PathLike, check: Callable[[Path, int, dict], None] | None = None) -> list[dict]:
    """The records of the output and of every part file, output first, each id once (a record
    can be in both when a merge was killed between writing the output and deleting the parts).
    check(file, line number, record), if given, sees every record (it raises on a bad one)."""
    seen, out = set(), []
    for p in [Path(path), *part_files(path)]:
        for n, rec in enumerate(read_jsonl(p) if p.is_file() else [], start=1):
            if check is not None:
                check(p, n, rec)
            if rec["id"] not in seen:
                seen.add(rec["id"])
                out.append(rec)
    return out


def mine(items: Sequence, world: World) -> list:
    """Problem i belongs to rank i % world: shares differ by at most one, at any world size."""
    return [x for i, x in enumerate(items) if i % world.size == world.rank]


def merge(path: str | os.PathLike, order: Iterable[str]) -> list[dict]:
    """Rewrite `path` with the records of the output and all part files, in the order of the
    ids in `order` (records of other ids follow in their order), then delete the parts; a file
    already in order with no parts is left untouched. Rank 0 alone calls it, once every rank
    is done with `path` (wait_for_ranks). Returns the records, in their new order."""
    records, parts = read_all(path), part_files(path)
    rank = {pid: i for i, pid in enumerate(order)}
    ordered = sorted(records, key=lambda r: rank.get(r["id"], len(rank)))  # stable: unknown ids keep their order
    if parts or [r["id"] for r in ordered] != [r["id"] for r in records]:
        write_jsonl_atomic(path, ordered)  # first the whole output; a kill before the unlinks leaves duplicates read_all drops
        for p in parts:
            p.unlink()
    return ordered


class PartLines:
    """Complete lines the other ranks appended to their parts of `path` since this was made: how
    a rank follows the others' progress (pairs kept, for --num-pairs) with no collective. Each
    look reads only the bytes appended since the last one, so it can be asked at every step."""

    def __init__(self, path: str | os.PathLike, world: World):
        others = [r for r in range(world.size) if r != world.rank] if world.distributed else []
        self.seen = {part_path(path, r): [0, 0] for r in others}  # part -> [bytes up to its last newline, newlines]
        self.start = self._count()

    def _count(self) -> int:
        for p, seen in self.seen.items():
            size = p.stat().st_size if p.is_file() else 0
            if size < seen[0]:  # rewritten (a rank only ever cuts bytes after its last newline): count again
                seen[:] = [0, 0]
            if size > seen[0]:
                with open(p, "rb") as f:
                    f.seek(seen[0])
                    chunk = f.read(size - seen[0])
                seen[0] += chunk.rfind(b"\n") + 1
                seen[1] += chunk.count(b"\n")
        return sum(lines for _, lines in self.seen.values())

    def new(self) -> int:
        return self._count() - self.start


def done_path(path: str | os.PathLike, rank: int) -> Path:
    """Rank `rank`'s note that its part of `path` is complete: pairs.jsonl -> pairs.rank1.done."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}.done")


def clear_done(path: str | os.PathLike) -> None:
    """Remove the done notes a killed run left for `path` (rank 0, before the start barrier)."""
    p = Path(path)
    for q in p.parent.glob(f"{p.stem}.rank*.done"):
        q.unlink(missing_ok=True)


def wait_for_ranks(world: World, path: str | os.PathLike, payload: dict | None = None, poll: float = 0.25) -> list[dict] | None:
    """Every rank says it is done with `path` by writing its done note (with `payload`); rank 0
    waits for all of them, deletes them and returns the payloads in rank order; the others
    return None at once and go on. A file and not a barrier: a rank whose share ran out early
    may wait hours for the others, longer than a collective's timeout (gloo's 30 minutes). If a
    rank dies, torchrun stops the others, rank 0's wait included. One process: [payload]."""
    if not world.distributed:
        return [payload or {}]
    write_json_atomic(done_path(path, world.rank), payload or {})
    if not world.is_main:
        return None
    notes = [done_path(path, r) for r in range(world.size)]
    while not all(n.is_file() for n in notes):
        time.sleep(poll)
    payloads = [read_json(n) for n in notes]
    for n in notes:
        n.unlink()
    return payloads


def on_main(world: World, fn: Callable[[], object]) -> object:
    """Run fn on rank 0 while the others wait; returns fn's result on rank 0, None elsewhere."""
    result = fn() if world.is_main else None
    barrier(world)
    return result


__all__ = ["World", "launched", "setup", "barrier", "all_reduce_sum", "sum_floats", "sum_grads", "gather", "shard_base", "my_slice",
           "part_path", "part_files", "write_path", "read_all", "mine", "merge", "PartLines", "done_path", "clear_done",
           "wait_for_ranks", "on_main"]
