"""Checkpoints of a distributed run: sharded through torch.distributed.checkpoint (DCP), atomic as ever.

`checkpoints/step-N/` of a run under torchrun holds:
- `dcp/`: the trainable parameters (`model`) and their AdamW state (`optim`), by qualified name, each rank
  writing its own shards (`__R_0.distcp`) and rank 0 the `.metadata`. Under a PEFT method only the adapter
  (the parameters that require grad) is saved, as in a one-process checkpoint's `trainable.safetensors`;
- `rank-R.json`: the RNG states of rank R (dropout masks differ by rank);
- `state.json`: as in one process (`train/state.py`), plus `world_size`, `strategy` and the scheduler state.

The rules of `train/checkpoint.py` hold: every rank writes into `.tmp-step-N-PID` (PID: rank 0's) and fsyncs
its own files (DCP's writer does for the shards), then rank 0 fsyncs every file again, writes the `COMPLETE`
marker with the size and sha256 of each, and renames the directory.
The directory must be on a file system every rank sees (one node, or a shared file system across nodes).

Resume is exact on the same world size. On another world size DCP reshards the parameters and the optimizer
state on load and the data position is global, so the run continues on the same samples; dropout draws
(per-rank RNG) and the order of floating-point sums differ, so it is not bit-identical.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from tunelab.config import RunConfig
from tunelab.errors import ArtifactError
from tunelab.jsonio import fsync_path
from tunelab.train import checkpoint, rng
from tunelab.train.batches import DataPosition
from tunelab.train.distributed import World, broadcast_from_main, gather_to_main, main_only
from tunelab.train.state import TrainState, Trainables, read_meta, state_meta

log = logging.getLogger("tunelab.train")

SHARDS = "dcp"
# torch.distributed.checkpoint is imported where it is used: it pulls in DTensor and sympy (about 2.5 s), which a
# one-process run (every compare worker, every CLI call) never needs


def is_sharded(path: Path) -> bool:
    """Whether checkpoint dir `path` was written by a distributed run."""
    return (path / SHARDS).is_dir()


def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # the trainable parameters only, as one process saves
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optim": optim_sd}


def _write_json(path: Path, data: dict) -> None:
    checkpoint.write_bytes(path, json.dumps(data).encode())


def save(world: World, root: Path, t: Trainables, optimizer, scheduler, state: TrainState,
         cfg: RunConfig) -> Path:
    """Write checkpoint `state.step` under `root` from every rank (a collective); returns its final path."""
    tmp = checkpoint.temp_dir(root, state.step, broadcast_from_main(world, os.getpid()))

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    main_only(world, prepare)
    try:
        import torch.distributed.checkpoint as dcp

        dcp.save(_state(t.model, optimizer), checkpoint_id=tmp / SHARDS)
        _write_json(tmp / f"rank-{world.rank}.json", {"rng": rng.capture()})
        fsync_path(tmp / f"rank-{world.rank}.json")  # by its writer: on a shared file system that is what counts
        hashed = gather_to_main(world, _own_records(tmp, world))  # every rank hashes its own shards, at once
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = state_meta(t, state, cfg) | {"world_size": world.size, "strategy": world.strategy,
                                        "scheduler": scheduler.state_dict()}

    def publish() -> str:
        writers = {"state.json": lambda path: _write_json(path, meta)}
        records = {name: record for part in hashed for name, record in part.items()}
        final = checkpoint.save_checkpoint(root, state.step, writers, filled=tmp, hashed=records)
        checkpoint.apply_retention(root, cfg.keep_last)
        return str(final)

    return Path(main_only(world, publish))


def _own_records(tmp: Path, world: World) -> dict[str, dict]:
    """`COMPLETE` records of the files this rank wrote: its DCP shards (`__R_*.distcp`, rank 0 also the
    `.metadata`) and `rank-R.json`."""
    own = [*(tmp / SHARDS).glob(f"__{world.rank}_*.distcp"), tmp / f"rank-{world.rank}.json"]
    if world.is_main:
        own.append(tmp / SHARDS / ".metadata")
    return {p.relative_to(tmp).as_posix(): checkpoint.file_record(p) for p in own if p.is_file()}


def load(world: World, path: Path, t: Trainables, optimizer, scheduler) -> TrainState:
    """Load a sharded checkpoint into every rank (a collective); returns the loop's counters.

    A checkpoint of a one-process run (no `dcp/`) cannot be resumed under torchrun, and the other way round:
    the error says so.
    """
    if not is_sharded(path):
        raise ArtifactError(f"{path}: written by a one-process run (trainable.safetensors, no {SHARDS}/); resume "
                            f"it without torchrun, or start this distributed run afresh")
    meta = read_meta(path)
    saved_world = int(meta.get("world_size", 0))
    if saved_world != world.size and world.is_main:
        log.warning("%s: saved by %d ranks, resuming on %d: DCP reshards the state; the samples are the same, "
                    "dropout draws and float summation order are not (not bit-identical)", path, saved_world,
                    world.size)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(t.model, optimizer)
    try:
        dcp.load(state, checkpoint_id=path / SHARDS)
        # the trainable parameters alone (the frozen base is not in the checkpoint); `dcp.load` has already
        # refused a checkpoint that lacks any of them
        set_state_dict(t.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        scheduler.load_state_dict(meta["scheduler"])
        rank_file = path / f"rank-{world.rank}.json"
        rng.restore(json.loads((rank_file if rank_file.is_file() else path / "rank-0.json").read_text())["rng"])
        return TrainState(step=int(meta["step"]), position=DataPosition.from_json(meta["position"], str(path)),
                          nan_skipped=int(meta.get("nan_skipped", 0)), elapsed=float(meta.get("elapsed", 0.0)))
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ArtifactError(f"{path}: checkpoint does not fit this run ({type(e).__name__}: {first}); expected "
                            f"the {SHARDS}/ shards, state.json and rank-R.json tunelab writes") from None
