"""What a checkpoint holds and a resume restores (docs/method.md §4): the student's trainable weights, its EMA,
the head pool with its sampling generator, both optimisers, every rank's RNG streams, the data position and the
counters. `state_dict()` / `load_state_dict()` in the three parts checkpoint.py writes (tensors, optimiser
states, JSON state), so a resumed run continues bitwise where the checkpoint left off."""

from __future__ import annotations

import torch

from ..errors import NitroFusionError
from ..models import student as student_lib
from . import fsdp
from .build import TrainParts


class TrainState:
    """A run's parts (build.py) with its data position, its generator and its counters."""

    def __init__(self, parts: TrainParts, loader, gen: torch.Generator) -> None:
        self.parts = parts
        self.acc, self.student, self.pool, self.opt_g, self.opt_d = (parts.acc, parts.student, parts.pool,
                                                                     parts.opt_g, parts.opt_d)
        self.ema, self.loader, self.gen, self.zero = parts.ema, loader, gen, parts.zero
        self.step, self.images, self.train_seconds = 0, 0, 0.0

    def state_dict(self) -> tuple[dict, dict, dict] | None:
        """(tensors, optimiser states, state) on the main process, None on the others. A collective: every rank
        calls it (ZeRO's optimiser shards and every rank's RNG streams are gathered)."""
        acc = self.acc
        if self.zero:  # every rank sends its optimiser shard to rank 0
            getattr(self.opt_g, "optimizer", self.opt_g).consolidate_state_dict(to=0)
        # every rank's RNG streams (t*, crops, noise): a resume with the same number of processes is exact
        rng = torch.stack([self.gen.get_state(), torch.get_rng_state()]).to(acc.device)
        rng = acc.gather(rng).cpu() if acc.num_processes > 1 else rng.cpu()
        if self.parts.fsdp:  # gathered whole (collectives: every rank takes part), written as without FSDP
            student_sd, ema_sd = fsdp.full_state(self.student), self.ema and {
                k: fsdp.full(v).cpu() for k, v in self.ema.shadow.items()}
            opt_g_sd = fsdp.full_optimizer_state(self.student, self.opt_g)
        if not acc.is_main_process:
            return None
        if not self.parts.fsdp:
            student_sd = student_lib.trainable_state(acc.unwrap_model(self.student))
            ema_sd = self.ema and self.ema.shadow
            opt_g_sd = self.opt_g.state_dict()
        pool_sd = dict(self.pool.state_dict())
        pool_sd["__generator__"] = self.pool.generator_state()
        rngs = {f"{kind}.{r}": rng[2 * r + i] for r in range(acc.num_processes)
                for i, kind in enumerate(("trainer", "torch"))}
        tensors = {"student": student_sd, "pool": pool_sd, "rng": rngs}
        if self.ema is not None:
            tensors["ema"] = ema_sd
        state = {"step": self.step, "images": self.images, "train_seconds": self.train_seconds,
                 "loader": self.loader.state()}
        return tensors, {"g": opt_g_sd, "d": self.opt_d.state_dict()}, state

    def load_state_dict(self, tensors: dict, optim: dict, state: dict, source: str = "the checkpoint") -> None:
        acc = self.acc
        saved_processes = sum(k.startswith("trainer.") for k in tensors["rng"])
        if saved_processes != acc.num_processes:  # data order, RNG streams and ZeRO shards are per process
            raise NitroFusionError(f"{source} was written by {saved_processes} process(es), this run has "
                                   f"{acc.num_processes}; resume with the same number (accelerate launch "
                                   f"--num_processes {saved_processes}) or start a new --out")
        if self.parts.fsdp:  # every rank read the whole state: each keeps its shard
            fsdp.load_full_state(self.student, tensors["student"])
            fsdp.load_full_optimizer_state(self.student, self.opt_g, optim["g"])
        else:
            student_lib.load_trainable_state(acc.unwrap_model(self.student), tensors["student"])
            self.opt_g.load_state_dict(optim["g"])
        self.pool.set_generator_state(tensors["pool"].pop("__generator__"))
        self.pool.load_state_dict(tensors["pool"])
        if self.ema is not None and "ema" in tensors:
            ema = {k: v.float() for k, v in tensors["ema"].items()}
            self.ema.shadow = fsdp.shard_like(ema, self.student) if self.parts.fsdp else ema
        self.opt_d.load_state_dict(optim["d"])
        self.gen.set_state(tensors["rng"][f"trainer.{acc.process_index}"])  # each rank continues its own streams
        torch.set_rng_state(tensors["rng"][f"torch.{acc.process_index}"])
        self.loader.load_state(state["loader"])
        self.step, self.images, self.train_seconds = state["step"], state["images"], state["train_seconds"]
