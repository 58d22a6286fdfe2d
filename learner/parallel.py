"""Data parallelism for the learner: `torchrun --nproc-per-node K orz learner`.

Every rank holds the actor and critic sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit per
decoder layer plus the root, as prime-rl and AReaL shard), NCCL on GPU and gloo on CPU (the same code).
Rank 0 alone talks to Redis, feeds prompts and broadcasts weights to generators; it sends each step's
trajectory groups to the other ranks as msgpack bytes (services/protocol.py) over a gloo control group —
never pickle — and every rank trains on its share of whole groups.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from services.control import RankCommand
from services.protocol import TrajectoryGroup

log = logging.getLogger("orz.learner")

CMD_BATCH, CMD_CHECKPOINT, CMD_FINAL, CMD_STOP = (RankCommand.BATCH, RankCommand.CHECKPOINT, RankCommand.FINAL,
                                                  RankCommand.STOP)


@dataclass
class DataParallel:
    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None  # training collectives (FSDP), None on one process
    control: dist.ProcessGroup | None = None  # gloo: batches and commands from rank 0
    device: torch.device = torch.device("cpu")  # where this rank trains
    mixed_precision: bool = False  # bf16 compute with fp32 master weights (FSDP2's MixedPrecisionPolicy)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one rank: batches are split and collectives cross processes."""
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """Models are FSDP2 modules: with several ranks, and with mixed precision also on one (the same
        semantics whatever the world size: bf16 compute, fp32 master weights, fp32 gradient reduction)."""
        return self.world > 1 or self.mixed_precision


def init_from_env(mixed_precision: bool = False) -> DataParallel:
    """A process group from torchrun's environment (WORLD_SIZE > 1), else the single-process context; with
    `mixed_precision` a single process gets a one-rank group too, for FSDP2's mixed-precision policy."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if world <= 1:
        if mixed_precision and not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return DataParallel(device=device, mixed_precision=mixed_precision,
                            group=dist.group.WORLD if mixed_precision else None)
    dist.init_process_group(backend)
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    dp = DataParallel(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, control, device, mixed_precision)
    log.info("data parallel: rank %d of %d (%s)", dp.rank, dp.world, backend)
    return dp


def close(dp: DataParallel) -> None:
    """Leave the process group on every rank: a barrier first, so no rank tears down while a peer's last
    collective is still under way, then destroy. A dead peer only costs a warning."""
    if not dp.sharded or not dist.is_initialized():
        return
    if not dp.enabled:  # the one-rank group of mixed precision: nobody to wait for
        dist.destroy_process_group()
        return
    try:
        dist.barrier(group=dp.control)
    except Exception as exc:  # a peer already gone: still release our side
        log.warning("data parallel: barrier at shutdown failed (%s)", exc)
    dist.destroy_process_group()


def end_process(dp: DataParallel, code: int = 0) -> None:
    """A data-parallel rank that finished cleanly exits here, without Python's finalization: FSDP's device
    mesh keeps the gloo group alive past destroy_process_group, and a gloo worker thread that frees its last
    work item (holding tensors with Python references) while the interpreter finalizes takes the GIL, is
    terminated, and aborts the process (SIGABRT, "terminate called without an active exception"; one exit
    in three on 2 CPU ranks, seen in a core dump). Everything is written and flushed before this."""
    if not dp.sharded:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF causal LM (`model.model.layers`) or bare backbone (`layers`)."""
    for path in ("model.layers", "backbone.layers", "layers"):
        node = model
        try:
            for attr in path.split("."):
                node = getattr(node, attr)
        except AttributeError:
            continue
        return list(node)
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}")


def shard(model: nn.Module, mixed_precision: bool = False) -> nn.Module:
    """FSDP2 in place: each decoder layer is a unit, the root takes the rest (embeddings, norm, head). With
    `mixed_precision`, parameters are cast to bf16 for compute and gradients reduced in fp32; the sharded
    parameters the optimiser steps stay fp32 (master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_state_dict(model: nn.Module, dp: DataParallel) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, on every rank (a collective when sharded)."""
    if not dp.sharded:
        return {k: v.detach() for k, v in model.state_dict().items()}
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
    return out


def split_groups(groups: list[TrajectoryGroup], world: int) -> list[list[int]]:
    """Whole groups per rank, balanced by tokens (greedy, longest first); deterministic for a given list."""
    cost = [sum(len(g.prompt_ids) + len(s.response_ids) for s in g.samples) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-cost[i], i))
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in order:
        r = min(range(world), key=lambda k: (load[k], len(shares[k]), k))
        shares[r].append(i)
        load[r] += cost[i]
    return [sorted(s) for s in shares]


def _broadcast_bytes(payload: bytes | None, dp: DataParallel) -> bytes:
    size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.long)
    dist.broadcast(size, src=0, group=dp.control)
    buf = torch.empty(int(size), dtype=torch.uint8)
    if dp.is_main:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src=0, group=dp.control)
    return buf.numpy().tobytes()


def send_command(dp: DataParallel, cmd: int, groups: list[TrajectoryGroup] | None = None) -> None:
    """Rank 0: tell the other ranks what comes next (a batch of groups, a checkpoint, the final gather, or stop)."""
    if not dp.enabled:
        return
    _broadcast_bytes(RankCommand(cmd, tuple(groups or ())).to_bytes(), dp)


def receive_command(dp: DataParallel) -> tuple[int, list[TrajectoryGroup]]:
    """Ranks > 0: the next command from rank 0."""
    msg = RankCommand.from_bytes(_broadcast_bytes(None, dp))
    return msg.cmd, list(msg.groups)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DataParallel) -> dict:
    """The optimiser's full (unsharded) state keyed by parameter name, so a run resumes on any world size.
    A collective when sharded; rank 0 holds the tensors on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=dp.sharded)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None,
                         dp: DataParallel) -> None:
    """Inverse of `optimizer_state`; when sharded, rank 0 passes the state and the others None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dp.enabled)
    set_optimizer_state_dict(model, optimizer, state if state is not None else {}, options=options)
