"""Training on several processes through torch.distributed: torchrun launches, FSDP2 or DDP shards, one loop.

tunelab runs distributed whenever it is started by `torchrun` (the `RANK`/`WORLD_SIZE` variables it sets), even
with one process. Everything a rank needs to know lives in a `World`; the training loop asks it for its slice
of each optimizer step's window, for the models to forward through, and to agree with the other ranks.

- **Sharding.** `--strategy fsdp`: FSDP2 (`fully_shard`) on every transformer block, then on the root; on CUDA with
  bf16 a `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`. Each block frees its gathered weights after
  its forward and gathers them again for the backward, unless `reshard_after_forward` says never, or auto finds the
  whole model in the compute dtype within `KEEP_GATHERED_SHARE` of the GPU's memory (an 8B model in bf16 is 11% of
  an H200): then the backward's gather is saved, at that memory (8B full on two H200s: +2.4%,
  bench/results/train_multi_gpu_h200x2_8b_reshard_ab.json). `--strategy ddp`: DDP, parameters replicated and
  gradients all-reduced. `auto` takes DDP when one GPU holds the replicated training state (the weights, plus
  gradients and AdamW moments of what trains) in `DDP_AUTO_SHARE` of its memory, else FSDP2: on two H200s DDP
  measured faster wherever it fitted (1B LoRA 1.92x one GPU against FSDP2's 1.39x, 1B full 1.87x against 1.75x, 8B
  LoRA 1.95x; bench/results/train_multi_gpu_h200x2_*.json), since FSDP2 gathers every frozen weight twice a step
  while DDP only reduces the gradients. On CPU (gloo) `auto` takes FSDP2 from `FSDP_AUTO_PARAMS` parameters on. On a
  world of one process it wraps nothing (`none`): there is nothing to shard or reduce, and a wrapper's per-block
  gathers and copies would only cost time (as torchtitan applies FSDP only when it shards). Checkpoints are DCP's
  all the same, so such a run resumes on more ranks like any other. A PEFT method's frozen base is sharded like any
  weight; only its adapter parameters carry gradients and optimizer state, since only they require grad.
- **Data.** The window of an optimizer step (`batch_size * grad_accum` examples, `train/batches.py`) is the
  same on every world size. Rank r takes the r-th contiguous share and splits it into micro-batches of
  `batch_size`; every rank runs the same number of micro-batches (collectives must match), a rank short of
  examples runs a padding micro-batch whose labels are all ignored (zero loss, zero gradient).
- **Loss.** Each rank backpropagates `loss_sum / (window_targets / world_size)`: the DDP and FSDP2 gradient
  reductions average over ranks, so the reduced gradient is that of the window's mean loss, as on one process.
"""

from __future__ import annotations

import datetime
import inspect
import math
import os
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from tunelab.errors import ConfigError, PeerFailed
from tunelab.train.optim import LOW_PRECISION

FSDP_AUTO_PARAMS = 1_000_000_000  # `--strategy auto` on CPU: FSDP2 from 1B parameters on (else DDP)
KEEP_GATHERED_SHARE = 0.15  # FSDP2 on CUDA: keep gathered weights to the backward when the model takes this share
DDP_AUTO_SHARE = 0.5  # `--strategy auto` on CUDA: DDP when the replicated state takes at most this share of a GPU
TRAINING_BYTES_PER_TRAINABLE = 4 + 4 + 8  # DDP's gradient bucket, the gradient, AdamW's two moments (fp32 bounds)
FAIL_RANK_ENV = "TUNELAB_TEST_FAIL_RANK"  # test hook: "RANK:STEP" makes that rank raise bad input at that step


@dataclass
class World:
    """This process's place among the ranks, and the wrapped model it forwards through."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    enabled: bool = False  # started by torchrun, with a process group
    strategy: str | None = None  # "fsdp", "ddp" or "none" once `wrap` ran
    keep_gathered: bool = False  # FSDP2: blocks keep their gathered weights from the forward to the backward
    forward_model: nn.Module | None = None  # what the loop calls (the DDP wrapper; the model itself under FSDP2)
    peak_bytes: list[int] = field(default_factory=list)
    # `--master-weights` under FSDP2: the parameters held in fp32 for training, by name, with their own dtype
    masters: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def collective_device(self) -> torch.device:
        """Where small tensors for collectives live: the GPU under NCCL, the CPU under gloo."""
        if self.enabled and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets the torch.distributed env)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def rank_label() -> str | None:
    """'rank R' of a process started by torchrun, else None (what error lines start with)."""
    return f"rank {os.environ['RANK']}" if launched_by_torchrun() else None


def init_world(device: str, timeout_s: float) -> World:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); a plain `World` otherwise.

    `timeout_s` bounds every collective: a rank that vanished mid-step makes the others fail within it.
    """
    if not launched_by_torchrun():
        return World()
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU at init instead of at the first collective
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=torch.device("cuda", local) if cuda else None)
    return World(rank=rank, size=size, local_rank=local, enabled=True)


def rank_device(world: World, device: str) -> str:
    """The device string this rank loads the model on: its own GPU (LOCAL_RANK) when running on CUDA."""
    if world.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    if world.enabled and device.startswith("cuda:") and world.size > 1:
        raise ConfigError(f"--device {device}: under torchrun each rank uses the GPU of its LOCAL_RANK; "
                          f"expected --device cuda or auto")
    return device


def choose_strategy(requested: str, model: nn.Module, method_name: str, world_size: int = 2) -> str:
    """'fsdp', 'ddp' or 'none' (auto on one process) for `requested` ('auto', 'fsdp', 'ddp'); QLoRA's NF4 base is
    refused by FSDP2."""
    strategy = requested
    if requested == "auto" and world_size == 1:
        return "none"
    if requested == "auto":
        strategy = "ddp" if method_name == "qlora" or replicated_state_fits(model) else "fsdp"
    if strategy == "fsdp" and method_name == "qlora":
        raise ConfigError("--strategy fsdp: qlora's NF4 base weights cannot be sharded by FSDP2 here (torchao's "
                          "NF4Tensor does not support all of fully_shard's ops); use --strategy ddp")
    return strategy


def replicated_state(model: nn.Module) -> int:
    """Bytes one rank holds under DDP before activations: every weight, and for each trainable parameter its
    gradient, DDP's bucket copy and AdamW's two moments (counted at fp32: an upper bound)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights + trainable * TRAINING_BYTES_PER_TRAINABLE


def gpu_memory_of(model: nn.Module) -> int | None:
    """The total memory of the GPU `model` is on; None on CPU."""
    first = next(model.parameters(), None)
    return torch.cuda.get_device_properties(first.device).total_memory if first is not None and first.is_cuda \
        else None


def replicated_state_fits(model: nn.Module, gpu_memory: int | None = None) -> bool:
    """`auto`'s test for DDP on `model`, with a GPU's memory (`gpu_memory`, else that of the GPU the model is on)."""
    if gpu_memory is None:
        gpu_memory = gpu_memory_of(model)
    return prefers_ddp(replicated_state(model), sum(p.numel() for p in model.parameters()), gpu_memory)


def prefers_ddp(state_bytes: float, params: int, gpu_memory: int | None) -> bool:
    """The rule of `auto` (train, and `tunelab plan --nproc`): with a GPU's memory, DDP when the replicated
    state takes at most `DDP_AUTO_SHARE` of it (the rest is for activations); without one (CPU), DDP below
    `FSDP_AUTO_PARAMS` parameters."""
    if gpu_memory is not None:
        return state_bytes <= DDP_AUTO_SHARE * gpu_memory
    return params < FSDP_AUTO_PARAMS


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the classes in HF's `_no_split_modules`, else the
    members of the longest `nn.ModuleList` (an encoder's layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def keeps_gathered(requested: str, compute_bytes: float, gpu_memory: int | None) -> bool:
    """Whether FSDP2's blocks keep their gathered weights from the forward to the backward (train, and `tunelab
    plan`): `requested` never/always, or auto: on a GPU, when the model in its compute dtype (`compute_bytes`)
    takes at most `KEEP_GATHERED_SHARE` of `gpu_memory`; on CPU (no `gpu_memory`) never."""
    if requested != "auto":
        return requested == "never"
    return gpu_memory is not None and compute_bytes <= KEEP_GATHERED_SHARE * gpu_memory


def wrap(world: World, model: nn.Module, strategy: str, bf16: bool, reshard_after_forward: str = "auto") -> None:
    """Shard (FSDP2) or replicate (DDP) `model` across the ranks; sets `world.forward_model`.

    Call before the optimizer is built: FSDP2 replaces each parameter by a sharded DTensor parameter.
    """
    world.strategy = strategy
    if strategy == "none":  # one process: the model as it is
        world.forward_model = model
        return
    if strategy == "ddp":
        cuda = next(model.parameters()).is_cuda
        # every rank loaded the same weights and seeded the same adapter init: no broadcast needed (NF4 bases
        # could not be broadcast anyway); buffers are constants (rotary tables)
        ddp = nn.parallel.DistributedDataParallel
        # torch 2.13 renamed broadcast_buffers (deprecated there) to forward_sync_buffers
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
            else "broadcast_buffers"
        world.forward_model = ddp(model, device_ids=[torch.cuda.current_device()] if cuda else None,
                                  init_sync=False, **{no_sync: False})
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    compute_bytes = sum(p.numel() * (2 if bf16 else p.element_size()) for p in model.parameters())
    world.keep_gathered = keeps_gathered(reshard_after_forward, compute_bytes, gpu_memory_of(model))
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=not world.keep_gathered)
    fully_shard(model, mp_policy=policy)  # the root keeps its weights to the backward in any case
    world.forward_model = model


def hold_trained_in_fp32(world: World, model: nn.Module) -> None:
    """`--master-weights` under FSDP2: every trained 16-bit parameter becomes fp32 in place (tied ones once), so
    its shards, gradients and AdamW moments are fp32 while `MixedPrecisionPolicy(param_dtype=bf16)` gathers
    and computes in bf16 (as torchtitan trains). `consolidate` gives the artifact their own dtype back."""
    for name, p in model.named_parameters():  # FSDP2 keeps these names for the sharded parameters
        if p.requires_grad and p.dtype in LOW_PRECISION:
            world.masters[name] = p.dtype
            p.data = p.data.float()


def rank_share(window: list[list[int]], batch_size: int, world: World) -> list[list[int]]:
    """This rank's micro-batches of a window (lists of example indices); `[]` marks a padding micro-batch.

    window: the global micro-batches of one optimizer step. Every rank gets the same number of entries.
    """
    flat = [i for micro in window for i in micro]
    share = math.ceil(len(flat) / world.size)
    mine = flat[world.rank * share:(world.rank + 1) * share]
    count = math.ceil(share / batch_size)
    micro = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    return micro + [[] for _ in range(count - len(micro))]


def without_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A padding micro-batch: the same inputs with every label ignored (zero loss and gradient)."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


def sum_across(world: World, values: list[float | torch.Tensor]) -> list[float]:
    """The sum of each value over every rank (one all-reduce), as floats."""
    device = world.collective_device()
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device).reshape(()) for v in values])
    if world.enabled:
        dist.all_reduce(t)
    return t.tolist()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a replicated gradient norm under FSDP2); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def broadcast_from_main(world: World, value):
    """Rank 0's `value` on every rank (a picklable object)."""
    if not world.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_only(world: World, fn):
    """`fn()` on rank 0, its result on every rank. An error there is raised there (rank 0 reports it) and
    becomes a quiet `PeerFailed` on the others, instead of leaving them waiting in a collective."""
    if not world.enabled:
        return fn()
    if world.is_main:
        try:
            result = fn()
        except BaseException as e:
            broadcast_from_main(world, (f"{type(e).__name__}: {e}", None))
            raise
        broadcast_from_main(world, (None, result))
        return result
    error, result = broadcast_from_main(world, (None, None))
    if error is not None:
        raise PeerFailed(f"stopped: rank 0 failed ({error})")
    return result


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank died or timed out."""
    if isinstance(error, PeerFailed) or type(error).__name__ in ("DistBackendError", "DistNetworkError"):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "connection closed by peer", "connection reset", "gloo", "nccl", "timed out", "broken pipe"))


def failure_hook(world: World, step: int) -> None:
    """Test hook `TUNELAB_TEST_FAIL_RANK=R:S[:kill]`: at the start of step S, rank R raises bad input (or, with
    `:kill`, SIGKILLs itself); the other ranks carry on into the step's collectives."""
    spec = os.environ.get(FAIL_RANK_ENV, "")
    if not spec:
        return
    rank, at, *kill = spec.split(":")
    if world.rank == int(rank) and step == int(at):
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise ConfigError(f"injected bad input at step {step} ({FAIL_RANK_ENV}={spec})")


def consolidate(world: World, model: nn.Module, trainable_only: bool) -> None:
    """Make FSDP2's sharded parameters whole again on rank 0 (on the CPU), for the artifact writers (a collective).

    Every rank gathers each parameter in the same order; rank 0 swaps the gathered tensor in for the sharded
    one (tied parameters stay tied) and gives every module back its own class, so `save_pretrained` and the
    PEFT writer see the model a one-process run has. `trainable_only`: gather just the parameters that require
    grad (an adapter artifact needs no base weights). The model is not trainable afterwards.
    """
    if world.strategy != "fsdp":
        return
    from torch.distributed.fsdp import FSDPModule

    whole: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters():  # the same order on every rank
        if trainable_only and not p.requires_grad:
            continue
        full = full_value(p).detach().cpu()
        if world.is_main:  # a master held in fp32 goes back to its own dtype
            whole[id(p)] = nn.Parameter(full.to(world.masters.get(name, full.dtype)), requires_grad=p.requires_grad)
    if not world.is_main:
        return
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and id(p) in whole:
                module._parameters[key] = whole[id(p)]
        if isinstance(module, FSDPModule):
            module.__class__ = type(module).__bases__[1]  # FSDP2 made the class (FSDPModule, original)


def gather_to_main(world: World, value) -> list:
    """`value` of every rank, in rank order, on rank 0 (a picklable object); `[]` on the other ranks."""
    if not world.enabled:
        return [value]
    out: list | None = [None] * world.size if world.is_main else None
    dist.gather_object(value, out, dst=0)
    return out or []


def gather_ints(world: World, value: int) -> list[int]:
    """`value` of every rank, in rank order."""
    if not world.enabled:
        return [value]
    out: list = [None] * world.size
    dist.all_gather_object(out, value)
    return [int(v) for v in out]


def shutdown() -> None:
    """Leave the process group, if this process joined one (after its last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
