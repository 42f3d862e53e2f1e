"""torch's `DataLoader` over a cifar_fast dataset: its arguments, its data-parallel semantics
(`DistributedSampler`'s, the ranks' settings checked against each other), and torchdata's
`StatefulDataLoader` resume, over the native pipeline's epochs."""

import datetime
import itertools
import json
import threading
import warnings

from . import _native
from ._datasets import _check_int, _Dataset
from ._output import converter, resolve, torch_or_none

_PIN_WARNED = False
_PIN_LOCK = threading.Lock()

#: How long a rank waits for the others to make their DataLoader before it gives up.
AGREE_TIMEOUT = datetime.timedelta(seconds=120)
_AGREEMENTS = itertools.count()


def _warn_pin_once():
    global _PIN_WARNED
    with _PIN_LOCK:
        if not _PIN_WARNED:
            _PIN_WARNED = True
            warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then device "
                          "pinned memory won't be used.", stacklevel=4)


class DataLoader:
    """torch's `DataLoader` over a cifar_fast dataset, its batches made by native workers.

    Each `iter()` is the next epoch (or the one `set_epoch` names); `len()` is the batches of an
    epoch. The batches are the same whatever `num_workers` for a `seed` (by default drawn from
    torch's generator, so `torch.manual_seed` fixes it). `state_dict()` / `load_state_dict()`
    resume at any point as torchdata's `StatefulDataLoader` does (a state taken at an epoch's
    end resumes at the next epoch; `set_epoch` of the epoch resumed keeps its place).

    Where `torch.distributed` is initialised each rank loads its shard as `DistributedSampler`
    gives it (the epoch's order padded by repetition to a multiple of the world size, or cut to
    one with `drop_last`; every `world_size`-th sample from `rank` on), so every rank has the
    same number of batches; the ranks check each other's settings at construction and shuffle
    with rank 0's seed. A `sampler` of torch's (a `DistributedSampler`, say) is followed as torch
    follows it. `pin_memory=True` gives page-locked batches where CUDA is available and warns
    once where it is not."""

    #: What fixes the batches: set after construction, refused (as torch refuses its own).
    _FIXED = frozenset(("dataset", "batch_size", "sampler", "batch_sampler", "drop_last", "persistent_workers",
                        "shuffle", "seed", "rank", "world_size", "generator", "output"))

    def __init__(self, dataset, batch_size=1, shuffle=None, sampler=None, batch_sampler=None, num_workers=0,
                 collate_fn=None, pin_memory=False, drop_last=False, timeout=0, worker_init_fn=None,
                 multiprocessing_context=None, generator=None, *, prefetch_factor=None, persistent_workers=False,
                 pin_memory_device="", in_order=True, seed=None, rank=None, world_size=None, output=None):
        if not isinstance(dataset, _Dataset):
            raise TypeError(f"dataset must be a cifar_fast dataset (CIFAR10, CIFAR100, ImageFolder, TensorFile), "
                            f"not {type(dataset).__name__}; for other datasets use torch.utils.data.DataLoader")
        for name, value in (("collate_fn", collate_fn), ("worker_init_fn", worker_init_fn)):
            if value is not None:
                raise TypeError(f"{name} is not run by cifar_fast: no Python code runs on its workers; batches are "
                                "(images, labels) tensors")
        if batch_sampler is not None:
            raise TypeError("batch_sampler is not run by cifar_fast: give sampler= and batch_size=")
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        if prefetch_factor is not None:
            if num_workers == 0:
                raise ValueError("prefetch_factor option could only be specified in multiprocessing.let num_workers "
                                 "> 0 to enable multiprocessing, otherwise set prefetch_factor to None.")
            _check_int("prefetch_factor", prefetch_factor, 1)
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers option needs num_workers > 0")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError("timeout option should be non-negative")
        if sampler is not None:
            if shuffle:
                raise ValueError("sampler option is mutually exclusive with shuffle")
            if not hasattr(sampler, "__iter__"):
                raise TypeError(f"sampler should be a torch Sampler or another iterable of indices, not "
                                f"{type(sampler).__name__}")
        resolve(output)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed should be an integer, but got seed={seed!r}")
        shuffle = bool(shuffle)
        rank, world_size, group = _shard(rank, world_size, sampler)
        seed_given = seed is not None
        if seed is None:
            if world_size > 1 and group is None and shuffle:
                raise ValueError(f"rank {rank} of {world_size} shuffles with a seed of its own: give seed= (the same "
                                 "on every rank), or initialise torch.distributed, whose rank 0's seed every rank "
                                 "then takes")
            seed = _draw_seed(generator)
        seed %= 1 << 64
        if group is not None:
            seed = _agree(group, dict(batch_size=batch_size, shuffle=shuffle, drop_last=bool(drop_last),
                                      dataset_len=len(dataset), world_size=world_size, seed=seed,
                                      seed_given=seed_given))
        d = self.__dict__
        d.update(dataset=dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, batch_sampler=None,
                 drop_last=bool(drop_last), seed=seed, rank=rank, world_size=world_size, generator=generator,
                 persistent_workers=bool(persistent_workers), output=output)
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.timeout = timeout
        self.multiprocessing_context = multiprocessing_context
        self.pin_memory_device = pin_memory_device
        self.in_order = in_order
        self._native = _native.Loader(dataset._native, batch_size, shuffle, seed, bool(drop_last), rank, world_size,
                                      world_size > 1)
        self._epoch = 0
        # A position loaded (or set) and not yet begun: (epoch, batches done), and whether the
        # epoch was named by set_epoch since.
        self._pending = None
        # A sampler's order for the epoch in progress, and one loaded to resume in: a sampler
        # draws its order afresh each iter() (RandomSampler from torch's generator), so a resumed
        # epoch replays the saved one, as torchdata's StatefulDataLoader restores its sampler.
        self._order = self._resume_order = None
        self._named = False
        d["_initialized"] = True

    def __setattr__(self, name, value):
        if name in self._FIXED and self.__dict__.get("_initialized"):
            raise ValueError(f"{name} attribute should not be set after {type(self).__name__} is initialized")
        super().__setattr__(name, value)

    def __len__(self):
        if self.sampler is not None:
            return self._native.batches_of(len(self.sampler))
        return len(self._native)

    def set_epoch(self, epoch):
        """The epoch the next `iter()` gives (as `DistributedSampler.set_epoch`). After
        `load_state_dict`, the epoch loaded goes on from where it stood."""
        epoch = _check_int("epoch", epoch, 0)
        if self._pending is None or self._pending[0] != epoch:
            self._pending = (epoch, 0)
        self._epoch = epoch
        self._named = True

    def __iter__(self):
        epoch, start = self._epoch, 0
        if self._pending is not None:
            epoch, start = self._pending
            if 0 < len(self) <= start and not self._named:
                # A state taken at an epoch's end resumes at the next epoch, whole.
                epoch, start = epoch + 1, 0
        resume_order = self._resume_order if start else None
        self._pending, self._named, self._resume_order = None, False, None
        self._epoch = epoch + 1
        order = None
        if self.sampler is not None:
            order = resume_order if resume_order is not None else [int(i) for i in self.sampler]
        self._order = order
        pin = self.pin_memory and resolve(self.output) == "torch" and _cuda_available()
        if self.pin_memory and not pin:
            _warn_pin_once()
        prefetch = None if self.prefetch_factor is None else self.prefetch_factor * max(1, self.num_workers)
        convert, capsule = converter(self.output)
        return self._native.epoch(self.dataset._native, epoch, start, self.num_workers, prefetch, not pin, order,
                                  # torch's timeout bounds the wait for workers: none without them
                                  convert, capsule, pin, float(self.timeout) if self.num_workers else 0.0)

    def state_dict(self):
        """Where the loader stands: the epoch and the batches of it already yielded, with the
        settings that fix the order (checked when loaded)."""
        epoch, done = self._pending if self._pending is not None else self._native.position()
        state = {"epoch": epoch, "batches_yielded": done, "seed": self.seed, "batch_size": self.batch_size,
                 "shuffle": self.shuffle, "drop_last": self.drop_last, "rank": self.rank,
                 "world_size": self.world_size, "dataset_len": len(self.dataset)}
        order = self._resume_order if self._pending is not None else self._order
        if self.sampler is not None and done and order is not None:
            state["sampler_order"] = list(order)
        return state

    def load_state_dict(self, state):
        """Resumes at `state`: the next `iter()` yields exactly the batches that remained, or,
        for a state taken at an epoch's end, the next epoch."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), not {type(state).__name__}")
        missing = [k for k in ("epoch", "batches_yielded", "seed") if k not in state]
        if missing:
            raise ValueError(f"state lacks {', '.join(missing)}: not a cifar_fast DataLoader state_dict()")
        for key in ("batch_size", "shuffle", "drop_last", "rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]!r}, this loader has {getattr(self, key)!r}")
        if "dataset_len" in state and state["dataset_len"] != len(self.dataset):
            raise ValueError(f"state was saved over {state['dataset_len']} samples, this dataset has {len(self.dataset)}")
        epoch = _check_int("epoch", state["epoch"], 0)
        done = _check_int("batches_yielded", state["batches_yielded"], 0)
        if done > len(self):
            raise ValueError(f"batches_yielded {done} is past the epoch's {len(self)} batches")
        seed = state["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed should be an integer, but got seed={seed!r}")
        if seed % (1 << 64) != self.seed:
            self.__dict__["seed"] = seed % (1 << 64)
            self._native = _native.Loader(self.dataset._native, self.batch_size, self.shuffle, self.seed,
                                          self.drop_last, self.rank, self.world_size, self.world_size > 1)
        order = state.get("sampler_order")
        if order is not None:
            if self.sampler is None:
                raise ValueError("state was saved with a sampler's order, and this loader has no sampler")
            if not isinstance(order, (list, tuple)) or any(
                    isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.dataset) for i in order):
                raise ValueError(f"sampler_order should list indices below {len(self.dataset)}")
            order = [int(i) for i in order]
        self._epoch = epoch
        self._pending, self._named, self._resume_order = (epoch, done), False, order


def _draw_seed(generator):
    torch = torch_or_none()
    if torch is not None:
        # As torch's DataLoader draws its base seed: from the generator given, else the default.
        return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
    import secrets
    return secrets.randbits(63)


def _cuda_available():
    torch = torch_or_none()
    return torch is not None and torch.cuda.is_available()


def _distributed():
    """`torch.distributed` where it is initialised, else None."""
    torch = torch_or_none()
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def _shard(rank, world_size, sampler):
    """`(rank, world_size, group)`: the shard to load and the process group whose ranks must
    agree on it (None where the shard was given by hand or a sampler decides)."""
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    dist = _distributed()
    if sampler is not None:
        if rank is not None:
            raise ValueError("sampler decides which samples this rank loads: give rank and world_size, or a "
                             "sampler, not both")
        return 0, 1, None
    if rank is None:
        if dist is not None and dist.get_world_size() > 1:
            return dist.get_rank(), dist.get_world_size(), dist
        return 0, 1, None
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank {rank} must be below world_size {world_size}")
    group = dist if dist is not None and (rank, world_size) == (dist.get_rank(), dist.get_world_size()) else None
    return rank, world_size, group if world_size > 1 else None


def _agree(dist, mine):
    """Every rank's loader settings, compared: a difference is a ValueError on every rank, and
    every rank returns one seed (the one given, else rank 0's). Exchanged through the process
    group's store, so that a rank whose peers never make their loader gets an error after
    `AGREE_TIMEOUT` rather than waiting forever."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = next(_AGREEMENTS)
    store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
    if store is None:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        keys = [f"cifar_fast/loader/{n}/{r}" for r in range(world)]
        store.set(keys[rank], json.dumps(mine))
        try:
            store.wait(keys, AGREE_TIMEOUT)
        except Exception:
            raise RuntimeError(
                f"cifar_fast.DataLoader on rank {rank} waited {AGREE_TIMEOUT.total_seconds():.0f} s for the other "
                f"ranks' DataLoader: make it on every rank (each loads its shard), or give rank=0, world_size=1 to "
                f"load the whole dataset on one rank alone") from None
        gathered = [json.loads(store.get(k)) for k in keys]
    for key in ("batch_size", "shuffle", "drop_last", "dataset_len", "world_size"):
        values = [g[key] for g in gathered]
        if len(set(values)) > 1:
            raise ValueError(f"the ranks' DataLoaders differ in {key}: {values} (by rank): every rank must load "
                             "with the same settings")
    given = {g["seed"] for g in gathered if g["seed_given"]}
    if len(given) > 1:
        raise ValueError(f"the ranks' DataLoaders were given different seeds {sorted(given)}: give one seed to "
                         "all, or none (every rank then takes rank 0's)")
    return given.pop() if given else gathered[0]["seed"]
