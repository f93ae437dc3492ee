"""Read a `torch.distributed.checkpoint` (DCP) directory without running code from it.

DCP unpickles two things on load, with the full `pickle` module:

- the `.metadata` file (`FileSystemReader.read_metadata`: `pickle.load`), and
- every non-tensor item, such as the optimizer's `param_groups` values
  (`DefaultLoadPlanner.load_bytes`: `torch.load(weights_only=False)`).

A crafted file can therefore run any code when a checkpoint is loaded. Tensors are already read
with `torch.load(weights_only=True)`.

`SafeReader` unpickles `.metadata` with `MetadataUnpickler`, whose `find_class` admits exactly the
classes DCP writes there (the metadata dataclasses, `torch.Size`, dtypes, the layout lookup and the
path it was saved to) and refuses every other global. Pickle reaches code only through globals
(`find_class`) and `persistent_load` (not defined here, so refused), and the admitted callables only
build plain values, so a file that passes cannot run anything. `SafePlanner` loads each non-tensor
item with `torch.load(weights_only=True)`, torch's own allow-list unpickler.

Imported only when a checkpoint is read: importing DCP costs ~1 s and ~50 MB (see `checkpoint._dcp`).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_METADATA_CLASSES = ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
# every global a DCP `.metadata` written by torch 2.13 refers to (read off the files it writes)
ALLOWED = frozenset(
    {("torch.distributed.checkpoint.metadata", n) for n in _METADATA_CLASSES}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
       ("torch", "Size"),
       ("torch.serialization", "_get_layout"),  # a dict lookup from the layout's name
       ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # StorageMeta.checkpoint_id
       ("collections", "OrderedDict")}
)


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A pickle in a checkpoint refers to something outside the allow-list; nothing was run."""

    def __init__(self, module: str, name: str):
        super().__init__(f"it refers to '{module}.{name}', which a checkpoint's metadata never holds")
        self.module, self.name = module, name


class MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals in `ALLOWED` (and torch dtypes)."""

    def find_class(self, module: str, name: str):
        # torch.__dict__, not getattr: torch's module __getattr__ would import submodules by name
        if (module, name) in ALLOWED or (module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(module, name)


def read_metadata_file(path: Path) -> Metadata:
    """The `Metadata` in a DCP `.metadata` file, unpickled through the allow-list.

    Raises `UnsafeCheckpoint` for a global outside it, `pickle.UnpicklingError` / `EOFError` for a
    damaged file, and `TypeError` when the file holds something other than DCP metadata.
    """
    with open(path, "rb") as f:
        md = MetadataUnpickler(f).load()
    if not isinstance(md, Metadata):
        raise TypeError(f"it holds a {type(md).__name__}, not DCP metadata")
    return md


class SafeReader(FileSystemReader):
    """`FileSystemReader` whose metadata goes through `read_metadata_file`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        # the body of FileSystemReader.read_metadata (torch 2.13) with the restricted unpickler
        md = read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafePlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that refuses non-tensor items torch's weights-only unpickler rejects."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # Checked on the very bytes the parent then reads: an item that passes the weights-only
        # allow-list refers to no other global, so the parent's full unpickling of it builds the same
        # plain values (and the parent keeps DCP's own bookkeeping for nested state dicts).
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)
