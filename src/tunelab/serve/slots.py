"""Decode steps on a preallocated KV cache, one slot per row, replayed as CUDA graphs on a GPU.

The running batch's rows decode through a `SlotCache`: per layer, keys and values (rows, kv_heads, length,
head_dim) allocated once, row i in slot i, its positions from column 0, and `lengths` (rows,) on the device with
the positions each row holds. A decode step writes each row's new key and value at its own length (one indexed
write per layer, no concatenation), so rows of any lengths share a step without padding, a finished row leaves
by compaction (the rows after it move up), and a joining row's prefilled cache is copied into the next free slot.

A step runs on a bucket of the live rows (1, 2, 4, 8, 16, 24, 32, ... rows; rows past the live ones are idle:
length 0, the base adapter) and a power-of-two window of columns that covers the longest row. The additive
attention mask and the position ids are computed from `lengths` inside the step, and every row's adapter comes
from a (rows,) slot index in a device buffer through the stacked path (`methods/stacked.py`), so a step reads
nothing from the host. On CUDA each (rows, columns) bucket is captured once as a CUDA graph (`Decoder`) and
replayed: one launch for the whole forward, with none of the Python and kernel-launch cost of a few hundred
modules. A graph is dropped, and recaptured on next use, when the cache is reallocated (it grew) or a stacked
adapter tensor it reads was rebuilt (an adapter was loaded or removed).

A step is captured only when every adapted module takes the stacked path. A module that would group rows by
adapter (`Routing.groups`, `mask`, `index`, `others`: PiSSA/OLoRA factors, embedding LoRA, ...) marks the step
while its graph is tried, and that set of loaded adapters then decodes eagerly, as before, with the same cache.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from tunelab.methods.kit import Routing, adapter_state
from tunelab.methods.stacked import IA3_STACK, LORA_STACK
from tunelab.serve.logits import Controls

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_COLUMNS = 64  # the smallest window of columns a step attends over
MIN_LENGTH = 256  # the smallest column capacity a cache is allocated with
# graphs kept at once (least recently replayed dropped first): each holds its (rows, vocab) output in the graphs'
# shared memory pool, and buckets of rows x windows of columns x base-only could otherwise reach a few hundred
MAX_GRAPHS = 48


def row_bucket(rows: int, most: int) -> int:
    """The rows a step on `rows` live rows runs: the smallest bucket that holds them, at most `most`."""
    return min(next((b for b in ROW_BUCKETS if b >= rows), rows), max(most, rows))


def power_of_two(n: int, least: int) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


def positions_needed(rows: list) -> int:
    """The most positions any of `rows` can hold: its prompt and max_tokens."""
    return max(len(r.request.prompt_ids) + r.request.max_tokens for r in rows)


def slot_ready(model) -> bool:
    """Whether the model's attention takes the slot cache's additive 4D mask (eager and SDPA attention do)."""
    cfg = model.config
    return not getattr(cfg, "is_encoder_decoder", False) and getattr(cfg, "_attn_implementation", None) in (
        "sdpa", "eager")


class SlotCache:
    """Keys and values of up to `rows` rows, each in its own slot from column 0 (see the module docstring).

    It answers the calls a transformers model makes on its cache (`update`, `get_seq_length`) for one-token
    decode steps; prefill stays on transformers' `DynamicCache`, whose rows `absorb` copies in.
    """

    is_compileable = False

    def __init__(self, shapes: list[tuple[int, int]], rows: int, length: int, dtype: torch.dtype, device):
        self.shapes, self.rows, self.length, self.dtype, self.device = shapes, rows, length, dtype, device
        self.keys = [torch.zeros(rows, h, length, d, dtype=dtype, device=device) for h, d in shapes]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # positions held per slot
        self.host: list[int] = []  # the same for the live rows 0..n-1, on the host
        self.generation = 0  # bumped when the tensors are reallocated: graphs that read them are stale
        self._slots = torch.arange(rows, device=device)
        self._view = (rows, length)  # (rows, columns) of the step being run

    # --- the calls a model makes --------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write one new position per row at its own length; return the step's window of keys and values."""
        rows, columns = self._view
        at = self.lengths[:rows]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._slots[:rows], :, at] = key_states[:, :, -1]  # (rows, heads, head_dim) at (slot, :, length)
        values[self._slots[:rows], :, at] = value_states[:, :, -1]
        return keys[:rows, :, :columns], values[:rows, :, :columns]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.host, default=0)

    def __len__(self) -> int:
        return len(self.keys)

    # --- rows coming and going ----------------------------------------------------------------------
    def view(self, rows: int, columns: int) -> None:
        """Set the step's bucket of rows and window of columns."""
        self._view = (rows, columns)

    def absorb(self, cache, lengths: list[int], at: int) -> None:
        """Copy the rows of a left-padded `DynamicCache` (row i's `lengths[i]` positions are its last columns)
        into slots `at`, `at + 1`, ..., from column 0."""
        count, longest = len(lengths), max(lengths)
        width = cache.layers[0].keys.shape[2]
        lens = torch.tensor(lengths, device=self.device)[:, None]
        source = (width - lens + torch.arange(longest, device=self.device)).clamp(0, width - 1)  # (count, longest)
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            index = source[:, None, :, None].expand(count, keys.shape[1], longest, keys.shape[3])
            keys[at:at + count, :, :longest] = layer.keys.gather(2, index)
            values[at:at + count, :, :longest] = layer.values.gather(2, index)
        self.lengths[at:at + count] = lens[:, 0]
        self.host[at:] = list(lengths)

    def keep(self, rows: list[int]) -> None:
        """Keep live rows `rows` (in that order) in slots 0..len(rows)-1; the freed slots go idle."""
        before = len(self.host)
        index = torch.tensor(rows, device=self.device)
        for keys, values in zip(self.keys, self.values):
            keys[:len(rows)] = keys.index_select(0, index)
            values[:len(rows)] = values.index_select(0, index)
        self.lengths[:len(rows)] = self.lengths.index_select(0, index)
        self.lengths[len(rows):before] = 0
        self.host = [self.host[i] for i in rows]

    def advance(self) -> None:
        """Every live row holds one more position (the one the step just wrote)."""
        self.lengths[:len(self.host)] += 1
        self.host = [n + 1 for n in self.host]

    def reserve(self, length: int, limit: int | None) -> None:
        """Make room for `length` positions per slot (grown to a power of two, at most `limit`)."""
        if length <= self.length:
            return
        grown = power_of_two(length, MIN_LENGTH)
        grown = max(length, min(grown, limit)) if limit else grown
        for i, (keys, values) in enumerate(zip(self.keys, self.values)):
            self.keys[i] = torch.zeros(*keys.shape[:2], grown, keys.shape[3], dtype=self.dtype, device=self.device)
            self.values[i] = torch.zeros_like(self.keys[i])
            self.keys[i][:, :, :self.length] = keys
            self.values[i][:, :, :self.length] = values
        self.length = grown
        self.generation += 1

    def clear(self) -> None:
        self.lengths.zero_()
        self.host = []


class FixedRouting(Routing):
    """Routing for a captured step: every row's slot from the device buffer `fixed` (filled before each replay),
    the mixed branch of the stacked path always. A module that asks for the rows of an adapter (which would bake
    this step's rows into a graph) sets `baked`."""

    def __init__(self, rows: int, names: tuple[str, ...], fixed: torch.Tensor, base: bool = False):
        super().__init__((None,) * rows, _Watched(self), names)
        # every row on the base: no adapter math at all (`only` None), else the gather for any mix of slots
        self.only, self.fixed, self.baked = (None if base else False), fixed, False

    def slots(self, device):
        return self.fixed

    def index(self, name, device):
        self.baked = True
        return super().index(name, device)

    def others(self, name, device):
        self.baked = True
        return super().others(name, device)

    def mask(self, name, like):
        self.baked = True
        return super().mask(name, like)


class _Watched(dict):
    """A routing's `groups` that tells its routing when a module reads it."""

    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def _read(self):
        self.owner.__dict__["baked"] = True

    def __getitem__(self, key):
        self._read()
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._read()
        return super().get(key, default)

    def __contains__(self, key):
        self._read()
        return super().__contains__(key)

    def __iter__(self):
        self._read()
        return super().__iter__()


@dataclass
class _Graph:
    replay: object  # runs the captured step (CUDAGraph.replay)
    logits: torch.Tensor  # (rows, vocab): the static output of a replay
    loaded: tuple[str, ...]  # the adapters loaded when it was captured
    generation: int  # the cache's generation then
    stacks: list[tuple[dict, str, object]]  # (module __dict__, key, stack) of every stack it reads

    def valid(self, loaded: tuple[str, ...], generation: int) -> bool:
        return (loaded == self.loaded and generation == self.generation
                and all(d.get(k) is s for d, k, s in self.stacks))


class Decoder:
    """The running batch's decode steps on one `SlotCache`, replayed as CUDA graphs when `graphs` (default: on
    CUDA). One wave uses it at a time (`claim`/`release`); another wave meanwhile decodes on a `DynamicCache`."""

    def __init__(self, model, *, rows: int, context: int | None, cache_kw: str, graphs: bool | None = None):
        self.model, self.rows, self.context, self.cache_kw = model, rows, context, cache_kw
        device = next(model.parameters()).device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.cache: SlotCache | None = None
        self._ids = torch.zeros(rows, 1, dtype=torch.long, device=device)  # the step's input tokens
        self._slot_ids = torch.zeros(rows, dtype=torch.long, device=device)  # each row's adapter slot
        self._slot_rows: tuple | None = None  # the (names, loaded) `_slot_ids` holds
        self._columns = torch.arange(0, device=device)
        self._captured: dict[tuple[int, int, bool], _Graph] = {}  # (rows, columns, base rows only)
        self._eager: set[tuple[str, ...]] = set()  # adapter sets whose steps cannot be captured
        self._pool = None
        self._claim = threading.Lock()
        self.captures = 0  # graphs captured so far

    # --- a wave's rows in and out -------------------------------------------------------------------
    def claim(self) -> bool:
        """Take the decoder for one wave; False when another wave holds it."""
        return self._claim.acquire(blocking=False)

    def release(self) -> None:
        if self.cache is not None:
            with torch.inference_mode():  # the cache was made under it: an inference tensor
                self.cache.clear()
        self._claim.release()

    def capturable(self) -> bool:
        """Whether the loaded adapters' steps can be captured (not found to group rows by adapter): a wave on a
        set that cannot be decodes on transformers' DynamicCache, which is faster than eager slot steps."""
        return tuple(adapter_state(self.model).methods) not in self._eager

    def adopt(self, batch, need: int):
        """`batch`, just prefilled on a `DynamicCache` (and its next tokens chosen), moved into the slot cache;
        `need`: the most positions any of its rows can reach (prompt + max_tokens)."""
        layers = batch.cache.layers
        shapes = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in layers]
        dtype = layers[0].keys.dtype
        if self.cache is None or self.cache.shapes != shapes or self.cache.dtype != dtype:
            self._captured.clear()  # free the old cache and the graphs that read it first
            self.cache = None
            length = power_of_two(need, MIN_LENGTH)
            length = max(need, min(length, self.context)) if self.context else length
            self.cache = SlotCache(shapes, self.rows, length, dtype, self._ids.device)
        self.cache.clear()
        self.cache.reserve(need, self.context)
        self.cache.absorb(batch.cache, batch.mask[:, :-1].sum(-1).tolist(), 0)
        return replace(batch, mask=None, pos=None, cache=self.cache)

    def join(self, batch, extra, need: int):
        """The rows of `batch` (on the slot cache) then those of `extra` (just prefilled, as for `adopt`)."""
        self.cache.reserve(need, self.context)
        self.cache.absorb(extra.cache, extra.mask[:, :-1].sum(-1).tolist(), len(batch.rows))
        tops = [k for k in (batch.top_k, extra.top_k) if k is not None]
        controls = Controls.concat(batch.controls, len(batch.rows), extra.controls, len(extra.rows))
        return replace(batch, rows=batch.rows + extra.rows, ids=torch.cat([batch.ids, extra.ids]),
                       controls=controls, top_k=max(tops) if tops else None)

    # --- one step -----------------------------------------------------------------------------------
    def step(self, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
        """One decode step of the live rows, `ids` (n, 1) their tokens and `names` their adapters (None: the
        base); returns their logits (n, vocab). Call with the engine's model lock held."""
        cache, n = self.cache, len(names)
        rows = row_bucket(n, self.rows)
        columns = min(power_of_two(max(cache.host) + 1, MIN_COLUMNS), cache.length)
        cache.view(rows, columns)
        self._ids[:n].copy_(ids)
        state = adapter_state(self.model)
        loaded = tuple(state.methods)
        logits = self._replay(rows, columns, names, loaded) if self.graphs and loaded not in self._eager else None
        if logits is None:
            state.row_adapters = list(names) + [None] * (rows - n)
            logits = self._forward(rows, columns)
        cache.advance()
        return logits[:n]

    def _forward(self, rows: int, columns: int) -> torch.Tensor:
        """The model on the step's bucket: rows at their own lengths, attending to columns 0..length."""
        cache = self.cache
        if self._columns.numel() != cache.length:
            self._columns = torch.arange(cache.length, device=self._ids.device)
        pos = cache.lengths[:rows, None]  # (rows, 1): a row's next position is its length
        blocked = self._columns[:columns] > pos  # (rows, columns)
        mask = torch.zeros(rows, 1, 1, columns, dtype=cache.dtype, device=pos.device)
        mask.masked_fill_(blocked[:, None, None, :], torch.finfo(cache.dtype).min)
        out = self.model(input_ids=self._ids[:rows], attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: cache})
        return out.logits[:, -1, :]

    def _replay(self, rows: int, columns: int, names: list[str | None], loaded: tuple[str, ...]):
        """The step through its CUDA graph (captured now if needed); None when it cannot be captured."""
        if self._slot_rows != (tuple(names), loaded, rows):
            slot = {name: i + 1 for i, name in enumerate(loaded)}
            slots = [slot[n] if n is not None else 0 for n in names] + [0] * (rows - len(names))
            self._slot_ids[:rows].copy_(torch.tensor(slots))
            self._slot_rows = (tuple(names), loaded, rows)
        key = (rows, columns, all(n is None for n in names))  # a batch of base rows has a graph of its own
        entry = self._captured.pop(key, None)  # re-inserted below: the dict's order is least recently replayed first
        if entry is not None and not entry.valid(loaded, self.cache.generation):
            entry = None
        if entry is None:
            entry = self._capture(key, loaded)
            if entry is None:
                return None
        self._captured[key] = entry
        while len(self._captured) > MAX_GRAPHS:
            del self._captured[next(iter(self._captured))]
        entry.replay()
        return entry.logits.clone()  # the next replay overwrites the graph's output

    def _capture(self, key: tuple[int, int, bool], loaded: tuple[str, ...]) -> _Graph | None:
        rows, columns, base = key
        state = adapter_state(self.model)
        routing = FixedRouting(rows, loaded, self._slot_ids[:rows], base)

        def run() -> torch.Tensor:
            with _routed(state, routing):
                return self._forward(rows, columns)

        run()  # eagerly first: builds the stacks; it writes what the replay will write
        if routing.baked:
            self._eager.add(loaded)
            return None
        stacks = [(m.__dict__, k, m.__dict__[k]) for m in self.model.modules()
                  for k in (LORA_STACK, IA3_STACK) if k in m.__dict__]
        replay, logits, self._pool = capture(run, self._pool)
        self.captures += 1
        return _Graph(replay, logits, loaded, self.cache.generation, stacks)


def capture(fn, pool) -> tuple:
    """`fn()` captured as a CUDA graph in memory pool `pool` (None: a new one): (replay, its output, the pool)."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the server's other threads (HTTP, tokenizing, adapter files) may use CUDA meanwhile; only this
    # thread's stream is captured, and forwards and adapter loads never overlap (both hold the model lock)
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph.replay, out, graph.pool()


@contextmanager
def _routed(state, routing: FixedRouting):
    """Route the forwards inside through `routing` (and forget it after: it must not serve an eager batch)."""
    state.row_adapters, state.routing = list(routing.rows), routing
    try:
        yield
    finally:
        state.row_adapters, state.routing = None, None
