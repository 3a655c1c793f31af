"""One process or torchrun: the rank's environment, collectives that do nothing alone, the device, autocast."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from ensemble.backpack import BackpackLM

from .config import BackpackTrainConfig

# --------------------------------------------------------------------------------------- distributed


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_type: str) -> DistEnv:
        """torchrun's WORLD_SIZE / RANK / LOCAL_RANK; init the process group if nobody has."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        env = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")
            env.initialized_here = True
        return env

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def broadcast(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.broadcast(t, 0)
        return t.cpu().tolist()

    def close(self) -> None:
        if self.initialized_here:
            torch.distributed.destroy_process_group()


class LogitsOnly(nn.Module):
    """What DDP wraps: the Backpack's forward, returning only the logits tensor."""

    def __init__(self, backpack: BackpackLM):
        super().__init__()
        self.backpack = backpack

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backpack(input_ids).logits


def autocast(device_type: str, amp: bool):
    if device_type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(cfg: BackpackTrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev
