"""Type stubs for cifar_fast (see the package docstring and docs/python.md)."""
from os import PathLike
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

_Path = Union[str, PathLike]
SUPPORTED_TRANSFORMS: str

class FormatError(ValueError): ...
class WorkerError(RuntimeError): ...

class _Dataset:
    transform: Any
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Tuple[Any, int]: ...
    @property
    def classes(self) -> list[str]: ...
    @property
    def targets(self) -> list[int]: ...
    @property
    def class_to_idx(self) -> dict[str, int]: ...

class TensorFile(_Dataset):
    def __init__(self, path: _Path, transform: Any = None, output: Optional[str] = None, *,
                 dct_scaling: bool = True, max_image_pixels: int = 89_478_485) -> None: ...

class CIFAR10(_Dataset):
    root: _Path
    train: bool
    def __init__(self, root: _Path, train: bool = True, transform: Any = None,
                 target_transform: Optional[Callable[[int], Any]] = None, download: bool = False,
                 output: Optional[str] = None) -> None: ...

class CIFAR100(CIFAR10): ...

class ImageFolder(_Dataset):
    root: _Path
    def __init__(self, root: _Path, transform: Any = None, target_transform: None = None, loader: None = None,
                 is_valid_file: None = None, allow_empty: bool = False, *, size: Optional[Tuple[int, int]] = None,
                 resize: bool = False, output: Optional[str] = None, dct_scaling: bool = True,
                 max_image_pixels: int = 89_478_485) -> None: ...
    @property
    def samples(self) -> list[Tuple[str, int]]: ...
    @property
    def imgs(self) -> list[Tuple[str, int]]: ...

def prepare(input: _Path, out: _Path = "data", dtype: str = "f32", mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None, dataset_stats: bool = False,
            size: Optional[Tuple[int, int]] = None, name: Optional[str] = None,
            force: bool = False, max_image_pixels: int = 89_478_485, store: Optional[str] = None,
            max_side: Optional[int] = None, quality: int = 90) -> dict[str, str]: ...

class DataLoader:
    dataset: _Dataset
    batch_size: int
    shuffle: bool
    sampler: Optional[Iterable[int]]
    num_workers: int
    drop_last: bool
    seed: int
    pin_memory: bool
    prefetch_factor: Optional[int]
    timeout: float
    rank: int
    world_size: int
    def __init__(self, dataset: _Dataset, batch_size: int = 1, shuffle: Optional[bool] = None,
                 sampler: Optional[Iterable[int]] = None, batch_sampler: None = None, num_workers: int = 0,
                 collate_fn: None = None, pin_memory: bool = False, drop_last: bool = False, timeout: float = 0,
                 worker_init_fn: None = None, multiprocessing_context: Any = None, generator: Any = None, *,
                 prefetch_factor: Optional[int] = None, persistent_workers: bool = False,
                 pin_memory_device: str = "", in_order: bool = True, seed: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 output: Optional[str] = None) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Tuple[Any, Any]]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
