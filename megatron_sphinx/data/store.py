"""The preprocessed sample store: a zarr group of flat arrays plus offsets, one shard per writer.

Layout of ``STORE.zarr`` (zarr format 3)::

    zarr.json                 root group; attrs["megatron_sphinx"] = store metadata (StoreMeta)
    shards/rNNNNN/            one group per writer (MPI rank), arrays:
        input_ids    int32 [T]      token ids of every sample, back to back
        target_mask  uint8 [T]      1 where the token is trained on
        text_offsets int64 [n + 1]  sample j's tokens are [text_offsets[j], text_offsets[j + 1])
        image_data   uint8 [B]      original encoded image bytes (JPEG / PNG ...), back to back
        image_offsets int64 [n + 1] sample j's bytes (empty for a text-only sample)
        image_hw     int32 [n, 2]   (height, width) after EXIF orientation; (0, 0) when no image
        image_slot   int32 [n]      text index before which the image's views go (1 = after BOS)
        source_ids   int32 [n]      mix source of the sample
        lengths      int64 [n]      sequence length after image expansion (geometry, skips counted)
        keys         int64 [n, 2]   (source id, record number in the source): the global order
    index/                    written once by rank 0 over all shards, in global order (keys sorted):
        shard int32 [N], local int64 [N], lengths int64 [N], source_ids int32 [N], image_hw [N, 2]
    tokenizer/                (optional) the tokenizer directory the store was made with

The global order depends only on the input (source order, record order), never on how many ranks
wrote it, so stores made by 1 and by 2 ranks read back sample for sample the same.

zarr 3.1.6 is ~30x slower for batched fancy indexing than for single contiguous slices, and even a
slice costs ~0.5-1 ms of zarr machinery. The big flat arrays are therefore stored uncompressed
(JPEG / PNG bytes do not compress; tokens would gain ~2x) and :class:`StoreReader` reads a sample's
slices straight from the chunk files (``os.pread``-style, ~microseconds) when the array's metadata
says they are raw little-endian bytes under zarr's default chunk keys in a local directory; any
other layout is read through zarr.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from megatron_sphinx.data.layout import Sample

logger = logging.getLogger(__name__)

STORE_FORMAT = "megatron_sphinx.store/2"
ATTR_KEY = "megatron_sphinx"
TEXT_CHUNK = 1 << 18  # tokens per chunk of ``input_ids`` / ``target_mask``
IMAGE_CHUNK = 1 << 20  # bytes per chunk of ``image_data`` (JPEG/PNG: stored uncompressed)
FLUSH_BYTES = 32 << 20  # writer buffer size before appending to the zarr arrays


class StoreError(ValueError):
    """A store that is missing, incomplete, or made for other settings."""


@dataclass
class StoreMeta:
    """What a store was made with; kept in the root group's attributes."""

    image_size: int
    """Padded-square side the lengths were computed for (448 / 672)."""
    grid: int
    """Sub-images per side the lengths were computed for."""
    seq_length: int
    """``--seq-length`` of preprocessing: no stored sample is longer."""
    source_names: list[str]
    """Mix source names; a sample's source id indexes this list."""
    tokenizer_path: str = ""
    """Tokenizer directory used (absolute path at preprocessing time)."""
    tokenizer_hash: str = ""
    """sha256 of the tokenizer's files (:func:`~megatron_sphinx.data.tokenizer.tokenizer_hash`)."""
    template: str = "sphinx"
    """Chat template name the dialogs were rendered with."""
    num_samples: int = 0
    """Samples in the store."""
    num_shards: int = 0
    """Shards (writers) the store has."""
    fingerprint: str = ""
    """Hash of the inputs and settings (mix, tokenizer, lengths): equal means the same store."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance (mix path, overlong policy, summary totals)."""
    format: str = STORE_FORMAT
    """Store format version."""

    def __post_init__(self) -> None:
        if self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} is not divisible by grid {self.grid}")
        if self.seq_length < 1:
            raise ValueError("seq_length must be positive")

    def to_json(self) -> dict:
        """A JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "StoreMeta":
        """Inverse of :meth:`to_json` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def shard_name(rank: int) -> str:
    """Group path of rank ``rank``'s shard inside the store."""
    return f"shards/r{rank:05d}"


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a megatron_sphinx store (complete or not)."""
    p = Path(path) / "zarr.json"
    if not p.is_file():
        return False
    try:
        attrs = json.loads(p.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return ATTR_KEY in attrs


def read_meta(path: str | os.PathLike) -> tuple[StoreMeta | None, bool]:
    """``(meta, complete)`` of the store at ``path`` (meta None when it is not a store)."""
    if not is_store(path):
        return None, False
    attrs = json.loads((Path(path) / "zarr.json").read_text())["attributes"][ATTR_KEY]
    return StoreMeta.from_json(attrs["meta"]), bool(attrs.get("complete"))


def create_store(path: str | os.PathLike, meta: StoreMeta) -> None:
    """Creates the root group (marked incomplete) at ``path``; call once, before the shards."""
    root = zarr.open_group(str(path), mode="w")
    root.create_group("shards")
    root.attrs[ATTR_KEY] = {"meta": meta.to_json(), "complete": False}


def _small_compressors():
    return [BloscCodec(cname="lz4", clevel=5)]


class ShardWriter:
    """Appends samples to one shard (one per MPI rank), buffering before each zarr append.

    Args:
        store_path: The store's root directory (made by :func:`create_store`).
        rank: Shard number (the writer's MPI rank).
        image_size: Padded-square side used for the stored lengths.
        grid: Sub-images per side used for the stored lengths.
    """

    def __init__(self, store_path: str | os.PathLike, rank: int, image_size: int, grid: int):
        self.image_size, self.grid = image_size, grid
        shards = zarr.open_group(os.path.join(str(store_path), "shards"), mode="r+")
        self.group = shards.create_group(shard_name(rank).split("/", 1)[1], overwrite=True)
        self._ids = self.group.create_array(
            "input_ids", shape=(0,), dtype="int32", chunks=(TEXT_CHUNK,), compressors=None,
            overwrite=True)
        self._mask = self.group.create_array(
            "target_mask", shape=(0,), dtype="uint8", chunks=(TEXT_CHUNK,), compressors=None,
            overwrite=True)
        self._image = self.group.create_array(
            "image_data", shape=(0,), dtype="uint8", chunks=(IMAGE_CHUNK,), compressors=None,
            overwrite=True)
        self._text_buf: list[np.ndarray] = []
        self._image_buf: list[bytes] = []
        self._buf_bytes = 0
        self._text_off = [0]
        self._image_off = [0]
        self._hw: list[tuple[int, int]] = []
        self._slot: list[int] = []
        self._src: list[int] = []
        self._len: list[int] = []
        self._keys: list[tuple[int, int]] = []
        self.closed = False

    def __len__(self) -> int:
        return len(self._len)

    def add(self, sample: Sample, image_bytes: bytes | None, key: tuple[int, int]) -> None:
        """Appends one sample.

        Args:
            sample: The tokenized sample; ``sample.image_hw`` must be set iff ``image_bytes`` is.
            image_bytes: The original encoded image file, or None for a text-only sample.
            key: ``(source id, record number)``; the store's global order sorts by it.
        """
        if (image_bytes is None) != (sample.image_hw is None):
            raise ValueError("image_bytes must be given exactly when sample.image_hw is set")
        ids = np.asarray(sample.input_ids, dtype=np.int32)
        self._text_buf.append((ids, np.asarray(sample.target_mask, dtype=np.uint8)))
        self._text_off.append(self._text_off[-1] + len(ids))
        nbytes = len(image_bytes) if image_bytes is not None else 0
        if image_bytes is not None:
            self._image_buf.append(image_bytes)
        self._image_off.append(self._image_off[-1] + nbytes)
        self._hw.append(tuple(sample.image_hw) if sample.image_hw is not None else (0, 0))
        self._slot.append(sample.image_slot)
        self._src.append(sample.source_id)
        self._len.append(sample.length(self.image_size, self.grid))
        self._keys.append((int(key[0]), int(key[1])))
        self._buf_bytes += 5 * len(ids) + nbytes
        if self._buf_bytes >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._text_buf:
            self._ids.append(np.concatenate([t[0] for t in self._text_buf]))
            self._mask.append(np.concatenate([t[1] for t in self._text_buf]))
        if self._image_buf:
            self._image.append(np.frombuffer(b"".join(self._image_buf), dtype=np.uint8))
        self._text_buf, self._image_buf, self._buf_bytes = [], [], 0

    def close(self, attrs: dict | None = None) -> int:
        """Flushes, writes the per-sample arrays and ``attrs`` (e.g. the rank's summary).

        Returns:
            Samples in the shard.
        """
        self._flush()
        g, n = self.group, len(self._len)
        small = {
            "text_offsets": np.asarray(self._text_off, dtype=np.int64),
            "image_offsets": np.asarray(self._image_off, dtype=np.int64),
            "image_hw": np.asarray(self._hw, dtype=np.int32).reshape(n, 2),
            "image_slot": np.asarray(self._slot, dtype=np.int32),
            "source_ids": np.asarray(self._src, dtype=np.int32),
            "lengths": np.asarray(self._len, dtype=np.int64),
            "keys": np.asarray(self._keys, dtype=np.int64).reshape(n, 2),
        }
        for name, arr in small.items():
            _write_array(g, name, arr)
        g.attrs.update({"num_samples": n, **(attrs or {})})
        self.closed = True
        return n


def _write_array(group, name: str, arr: np.ndarray) -> None:
    chunks = (max(1, min(len(arr), 1 << 18)),) + arr.shape[1:]
    a = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                           compressors=_small_compressors(), overwrite=True)
    if arr.size:
        a[...] = arr


def write_index(store_path: str | os.PathLike, meta: StoreMeta) -> StoreMeta:
    """Writes the global index over all shards and marks the store complete (rank 0, last).

    Samples are ordered by their ``(source id, record number)`` keys, so the order is the same
    whatever the number of shards.

    Returns:
        ``meta`` with ``num_samples`` and ``num_shards`` filled in.
    """
    root = zarr.open_group(str(store_path), mode="a")
    shards = sorted(root["shards"].group_keys()) if "shards" in root else []
    keys, shard_ids, local, lengths, srcs, hws = [], [], [], [], [], []
    for s, name in enumerate(shards):
        g = root["shards"][name]
        k = g["keys"][...].reshape(-1, 2)
        keys.append(k)
        shard_ids.append(np.full(len(k), int(name[1:]), dtype=np.int32))
        local.append(np.arange(len(k), dtype=np.int64))
        lengths.append(g["lengths"][...])
        srcs.append(g["source_ids"][...])
        hws.append(g["image_hw"][...].reshape(-1, 2))
    if keys:
        k = np.concatenate(keys)
        order = np.lexsort((k[:, 1], k[:, 0]))
        if len(order) > 1 and np.any(np.all(np.diff(k[order], axis=0) == 0, axis=1)):
            raise StoreError(f"{store_path}: two shards hold the same sample key")
        cat = lambda xs: np.concatenate(xs)[order]  # noqa: E731
        index = {"shard": cat(shard_ids), "local": cat(local), "lengths": cat(lengths),
                 "source_ids": cat(srcs), "image_hw": cat(hws)}
    else:
        index = {"shard": np.zeros(0, np.int32), "local": np.zeros(0, np.int64),
                 "lengths": np.zeros(0, np.int64), "source_ids": np.zeros(0, np.int32),
                 "image_hw": np.zeros((0, 2), np.int32)}
    ig = root.require_group("index")
    for name, arr in index.items():
        _write_array(ig, name, arr)
    meta = dataclasses.replace(meta, num_samples=int(len(index["shard"])), num_shards=len(shards))
    root.attrs[ATTR_KEY] = {"meta": meta.to_json(), "complete": True}
    return meta


class _Flat:
    """Contiguous slices of a 1-D zarr array, read straight from its chunk files when they hold
    raw little-endian values (no compression, default ``c/N`` keys, local directory), else through
    zarr. Files are opened per read, so the reader is safe to use after ``fork``."""

    def __init__(self, arr):
        self.arr = arr
        self.dtype = np.dtype(arr.dtype)
        self.chunk = int(arr.metadata.chunk_grid.chunk_shape[0])
        self.root: str | None = None
        try:
            codecs = arr.metadata.codecs
            endian = getattr(codecs[0], "endian", "x") if len(codecs) == 1 else "x"
            endian = getattr(endian, "value", endian)
            raw = (type(codecs[0]).__name__ == "BytesCodec" and sys.byteorder == "little"
                   and (endian == "little" or (endian is None and self.dtype.itemsize == 1)))
            cke = arr.metadata.chunk_key_encoding
            store = arr.store_path.store
            if (raw and isinstance(store, LocalStore) and getattr(cke, "name", "") == "default"
                    and getattr(cke, "separator", "") == "/"):
                self.root = os.path.join(str(store.root), arr.store_path.path)
        except (AttributeError, IndexError, TypeError):
            self.root = None

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b = int(sl.start), int(sl.stop)
        if self.root is None or b <= a:
            return self.arr[a:b]
        isz, parts, pos = self.dtype.itemsize, [], a
        while pos < b:
            c = pos // self.chunk
            n = min(b, (c + 1) * self.chunk) - pos
            try:
                with open(os.path.join(self.root, "c", str(c)), "rb") as f:
                    f.seek((pos - c * self.chunk) * isz)
                    buf = f.read(n * isz)
            except OSError:
                buf = b""
            if len(buf) != n * isz:  # not laid out as expected: let zarr read it
                return self.arr[a:b]
            parts.append(buf)
            pos += n
        return np.frombuffer(parts[0] if len(parts) == 1 else b"".join(parts), dtype=self.dtype)


class _Shard:
    """Lazily opened arrays of one shard (offsets held in memory)."""

    def __init__(self, group):
        self.ids = _Flat(group["input_ids"])
        self.mask = _Flat(group["target_mask"])
        self.image = _Flat(group["image_data"])
        self.text_off = group["text_offsets"][...]
        self.image_off = group["image_offsets"][...]
        self.slot = group["image_slot"][...]


class StoreReader:
    """Random access to a complete store.

    Args:
        path: The store directory (``STORE.zarr``).
        image_size: Expected padded-square side; a store made for another one is refused
            (its lengths would be wrong). None accepts the store's.
        grid: Expected sub-images per side; checked like ``image_size``.
        seq_length: If given, refuse a store holding a sample longer than this.

    Attributes:
        meta: The store's :class:`StoreMeta`.
        lengths: int64 ``[N]`` every sample's length after image expansion (for packing).
        source_ids: int32 ``[N]`` every sample's source id.
        image_hw: int32 ``[N, 2]`` (height, width) per sample, (0, 0) for text-only samples.
        has_image: bool ``[N]``.

    Raises:
        StoreError: A missing, incomplete or mismatched store, with what to change.

    The reader pickles by path (for loader worker processes): each process reopens the store.
    """

    def __init__(self, path: str | os.PathLike, image_size: int | None = None,
                 grid: int | None = None, seq_length: int | None = None):
        self.path = str(path)
        self._expect = (image_size, grid, seq_length)
        meta, complete = read_meta(path)
        if meta is None:
            raise StoreError(f"{path} is not a megatron_sphinx store: run "
                             "tools/preprocess_data.py --out PATH first")
        if not complete:
            raise StoreError(f"{path} is incomplete (preprocessing did not finish): run "
                             "tools/preprocess_data.py again with --overwrite")
        if meta.format != STORE_FORMAT:
            raise StoreError(f"{path} has store format {meta.format!r}, this code reads "
                             f"{STORE_FORMAT!r}: preprocess the data again")
        if image_size is not None and image_size != meta.image_size or (
                grid is not None and grid != meta.grid):
            raise StoreError(
                f"{path} was preprocessed for image_size {meta.image_size} grid {meta.grid}, "
                f"the model uses image_size {image_size} grid {grid}: preprocess again with "
                f"--image-size {image_size} --grid {grid}")
        self.meta = meta
        root = zarr.open_group(self.path, mode="r")
        ig = root["index"]
        self._shard_of = ig["shard"][...]
        self._local = ig["local"][...]
        self.lengths: np.ndarray = ig["lengths"][...]
        self.source_ids: np.ndarray = ig["source_ids"][...]
        self.image_hw: np.ndarray = ig["image_hw"][...].reshape(-1, 2)
        self.has_image: np.ndarray = self.image_hw[:, 0] > 0
        if seq_length is not None and len(self.lengths) and int(self.lengths.max()) > seq_length:
            raise StoreError(
                f"{path} holds samples up to {int(self.lengths.max())} tokens (made with "
                f"--seq-length {meta.seq_length}), longer than seq_length {seq_length}: "
                f"preprocess again with --seq-length {seq_length}")
        self._root = root
        self._shards: dict[int, _Shard] = {}

    @property
    def source_names(self) -> list[str]:
        """Mix source names; ``source_ids`` index this list."""
        return list(self.meta.source_names)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self) -> dict:
        return {"path": self.path, "expect": self._expect}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], *state["expect"])

    def _shard(self, s: int) -> _Shard:
        sh = self._shards.get(s)
        if sh is None:
            sh = self._shards[s] = _Shard(self._root[shard_name(s)])
        return sh

    def _locate(self, i: int) -> tuple[_Shard, int]:
        n = len(self.lengths)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a store of {n}")
        i = i % n if n else i
        return self._shard(int(self._shard_of[i])), int(self._local[i])

    def get_sample(self, i: int) -> Sample:
        """Sample ``i`` without its image bytes."""
        sh, j = self._locate(i)
        a, b = int(sh.text_off[j]), int(sh.text_off[j + 1])
        hw = self.image_hw[i]
        return Sample(
            input_ids=np.array(sh.ids[a:b], dtype=np.int32),
            target_mask=sh.mask[a:b].astype(bool),
            image_hw=(int(hw[0]), int(hw[1])) if hw[0] > 0 else None,
            image_slot=int(sh.slot[j]),
            source_id=int(self.source_ids[i]),
        )

    def get_image(self, i: int) -> bytes | None:
        """The original encoded image bytes of sample ``i``, or None (text-only)."""
        sh, j = self._locate(i)
        a, b = int(sh.image_off[j]), int(sh.image_off[j + 1])
        return sh.image[a:b].tobytes() if b > a else None

    def get(self, i: int) -> tuple[Sample, bytes | None]:
        """Sample ``i`` and its encoded image bytes (None for a text-only sample)."""
        return self.get_sample(i), self.get_image(i)

    def tokenizer_dir(self) -> Path | None:
        """The tokenizer directory stored inside the store, else the recorded path if it exists."""
        inner = Path(self.path) / "tokenizer"
        if inner.is_dir():
            return inner
        p = Path(self.meta.tokenizer_path) if self.meta.tokenizer_path else None
        return p if p is not None and p.is_dir() else None
