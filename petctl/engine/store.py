"""The prepared-case store: one Zarr v3 group per case, laid out for fast random patch reads.

Layout of `STORE/cases/<case>.zarr` (standard Zarr v3, readable by any Zarr v3 library):

- `image`  float16 (C=2, X, Y, Z), channel 0 = CT, 1 = PET, z-normalized, canonical (RAS) voxel
  order. Inner chunks (2, 48, 48, 48) — both channels in one chunk so one decompression serves a
  patch of both, and a 96³ patch touches at most 27 chunks; Blosc LZ4 + byte shuffle. Measured on
  prepared synthetic cases (single thread, patches/s · MiB): 32³ LZ4+shuffle 201 · 3.63,
  32³ LZ4 302 · 4.15, 48³ LZ4+shuffle 280 · 3.46, 48³ LZ4HC+shuffle 307 · 3.06, 48³ zstd 96 · 3.32.
  LZ4HC reads ~10% faster and is ~12% smaller but compresses >10× slower, which made it a third
  of prepare's time per case (bench/prepare.py); LZ4 keeps the store below nnU-Net's size.
  One shard per array covers the whole case, so a case is a handful of files, not thousands
  (shared HPC filesystems suffer under millions of small files).
- `label`  uint8 (X, Y, Z), same chunk/shard geometry.
- `lesion_coords` int32 (N, 4): (component, x, y, z), a bounded sample per lesion component so
  that lesion-centred sampling does not favour big lesions.
- `body_coords` int32 (M, 3): a sample of body voxels, for background-centred patches.
- group attributes: the case record (geometry needed to map predictions back, spacing, patient…).

Writes are crash-safe: a case is written to `cases/.tmp-<case>-<pid>` and renamed into place only
when complete; readers never see a half-written case.

Reads go through `ShardReader`, which parses each shard's index once, memory-maps the shard file
and decompresses only the inner chunks a patch touches (numcodecs' Blosc, GIL released), instead of
zarr-python's general async path whose per-chunk overhead dominates small reads. Its output is
checked against zarr-python in the tests.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from numcodecs import blosc as _blosc

# Patch reads are parallel across loader workers; blosc's own thread pool would only contend
# with them (and made single-thread reads of shuffled chunks ~20% slower).
_blosc.use_threads = False

from petctl.errors import PetctlError

CHUNK = 48
"""Inner chunk edge (voxels). 96³ patches touch at most 3³ chunks; see bench/patch_sampling.py."""
IMAGE_DTYPE = np.float16
# lesion_coords number a case's lesion components by this cc3d labelling of its label, in scan order;
# prepare writes them and the patch sampler re-derives component sizes with the same labelling.
LESION_CONNECTIVITY = 26
_EMPTY = 2**64 - 1


def _codecs() -> list[Any]:
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


def _shard_shape(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-s // c) * c for s, c in zip(shape, chunks))


@dataclass(frozen=True)
class StoredCase:
    """A case opened for reading: arrays behind fast readers plus its attribute record."""

    case: str
    attrs: dict[str, Any]
    image: "ShardReader"
    label: "ShardReader"
    lesion_coords: np.ndarray
    body_coords: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.label.shape)  # type: ignore[return-value]


class CaseStore:
    """A folder of prepared cases plus the stage's JSON files (manifest, fingerprint, splits)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.cases_dir = self.root / "cases"
        self._open: dict[str, StoredCase] = {}

    # -- listing -----------------------------------------------------------------------------
    def case_path(self, case: str) -> Path:
        from petctl.engine.cohort import is_valid_case_id

        if not is_valid_case_id(case):
            raise PetctlError(f"{case!r}: not a valid case id (letters, digits, '._-' only)")
        return self.cases_dir / f"{case}.zarr"

    def list(self) -> list[str]:
        """Cases that are completely written (temporary folders are never listed)."""
        if not self.cases_dir.is_dir():
            return []
        return sorted(p.name[: -len(".zarr")] for p in self.cases_dir.iterdir() if p.name.endswith(".zarr") and not p.name.startswith("."))

    def has(self, case: str) -> bool:
        return (self.case_path(case) / "zarr.json").exists()

    # -- writing -----------------------------------------------------------------------------
    def save(
        self,
        case: str,
        image_cxyz: np.ndarray,
        label_xyz: np.ndarray,
        lesion_coords: np.ndarray,
        body_coords: np.ndarray,
        attrs: dict[str, Any],
    ) -> Path:
        """Write one case atomically (temp folder, then rename); replaces an existing case."""
        import zarr

        final = self.case_path(case)
        self.cases_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cases_dir / f".tmp-{case}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            spatial = tuple(int(s) for s in label_xyz.shape)
            img_chunks = (image_cxyz.shape[0], CHUNK, CHUNK, CHUNK)
            _write_sharded(group, "image", np.ascontiguousarray(image_cxyz, dtype=IMAGE_DTYPE), (image_cxyz.shape[0], CHUNK, CHUNK, CHUNK))
            _write_sharded(group, "label", np.ascontiguousarray(label_xyz, dtype=np.uint8), (CHUNK,) * 3)
            for name, arr in (("lesion_coords", lesion_coords), ("body_coords", body_coords)):
                arr = np.ascontiguousarray(arr, dtype=np.int32)
                group.create_array(name, data=arr, chunks=tuple(max(1, s) for s in arr.shape), compressors=_codecs())
            group.attrs.update(attrs)
            _fsync_tree(tmp)
            if final.exists():
                old = self.cases_dir / f".old-{case}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._open.pop(case, None)
        return final

    def remove_stale_temporaries(self) -> list[str]:
        """Delete temp folders left by killed writers; returns their names."""
        if not self.cases_dir.is_dir():
            return []
        removed = []
        for p in self.cases_dir.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    # -- reading -----------------------------------------------------------------------------
    def load(self, case: str) -> StoredCase:
        """Open a case for reading (cached: shard files stay mapped, indexes stay parsed)."""
        hit = self._open.get(case)
        if hit is not None:
            return hit
        path = self.case_path(case)
        meta = _read_json(path / "zarr.json")
        lesion_coords = ShardReader(path / "lesion_coords").read_all()
        stored = StoredCase(
            case=case,
            attrs=meta.get("attributes", {}),
            image=ShardReader(path / "image", required=True),
            # an empty label may have no data file (zarr-python leaves an all-fill shard out); a case with lesions must have one
            label=ShardReader(path / "label", required=len(lesion_coords) > 0),
            lesion_coords=lesion_coords,
            body_coords=ShardReader(path / "body_coords").read_all(),
        )
        self._open[case] = stored
        return stored

    def read_patch(self, case: str, start_xyz: tuple[int, int, int], size_xyz: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(image float16 (C, *size), label uint8 (*size)); outside the volume: image 0, label 0.

        The image stays float16 (as stored): assembling chunks in their own dtype is a memcpy,
        while converting chunk by chunk costs 7× more; callers convert the whole patch once
        (torch's half→float is ~4× faster than numpy's).
        """
        stored = self.load(case)
        image = stored.image.read_box((0, *start_xyz), (stored.image.shape[0], *size_xyz))
        label = stored.label.read_box(tuple(start_xyz), tuple(size_xyz))
        return image, label

    def close(self) -> None:
        for stored in self._open.values():
            stored.image.close()
            stored.label.close()
        self._open.clear()

    # Pickling (DataLoader workers) carries only the path; each process opens its own files.
    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])


def _write_sharded(group: Any, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Write `data` as a one-shard Zarr v3 array: zarr-python writes the metadata, we write the shard.

    zarr-python's sharded write path spends ~0.5 s of CPU per case in its event loop; this writes
    the same bytes (inner chunks padded with the fill value, `bytes` + Blosc, all-fill chunks left
    out, index of (offset, nbytes) little-endian uint64 + CRC32C at the end) in a few tens of ms.
    The tests read every array back with zarr-python.
    """
    import google_crc32c

    group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=_shard_shape(data.shape, chunks),
                       compressors=_codecs(), fill_value=0, write_data=False)
    grid = tuple(-(-s // c) for s, c in zip(data.shape, chunks))
    index = np.full((int(np.prod(grid)), 2), _EMPTY, dtype="<u8")
    pieces: list[bytes] = []
    offset = 0
    for flat, cidx in enumerate(np.ndindex(*grid)):
        sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(cidx, chunks, data.shape))
        block = data[sl]
        if not block.any():
            continue  # equals the fill value: not stored, as zarr does
        if block.shape != chunks:
            padded = np.zeros(chunks, dtype=data.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        encoded = _blosc.compress(np.ascontiguousarray(block, dtype=data.dtype.newbyteorder("<")), b"lz4", 5, _blosc.SHUFFLE)
        index[flat] = (offset, len(encoded))
        pieces.append(encoded)
        offset += len(encoded)
    index_bytes = index.tobytes()
    pieces.append(index_bytes)
    pieces.append(np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes())
    shard = Path(group.store.root) / group.path / name / "c" / "/".join("0" for _ in data.shape) if group.path else \
        Path(group.store.root) / name / "c" / "/".join("0" for _ in data.shape)
    shard.parent.mkdir(parents=True, exist_ok=True)
    with open(shard, "wb") as fh:
        for piece in pieces:
            fh.write(piece)


class ShardReader:
    """Reads boxes from one Zarr v3 array written by `CaseStore.save` (single shard, Blosc or raw).

    Handles exactly the layout this module writes (C order, sharding_indexed with index at the
    end, bytes + optional crc32c index codecs, optional Blosc inner codec); anything else is refused
    with a clear error rather than misread.
    """

    def __init__(self, path: Path, *, required: bool = False) -> None:
        """`required`: the array always has a data file (`CaseStore.save` writes one for the image and
        the label), so it is opened now, and a missing one is an error rather than read as all fill."""
        self.path = Path(path)
        self._required = required
        meta = _read_json(self.path / "zarr.json")
        self.shape = tuple(int(s) for s in meta["shape"])
        self.dtype = np.dtype(_DTYPES[meta["data_type"]]).newbyteorder("<")
        self.fill_value = meta.get("fill_value", 0)
        codecs = meta["codecs"]
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        if codecs[0]["name"] == "sharding_indexed":
            cfg = codecs[0]["configuration"]
            self.chunks = tuple(int(c) for c in cfg["chunk_shape"])
            inner = [c["name"] for c in cfg["codecs"]]
            index_names = [c["name"] for c in cfg["index_codecs"]]
            if cfg.get("index_location", "end") != "end" or index_names[0] != "bytes":
                raise PetctlError(f"{self.path}: unsupported shard index layout {cfg}")
            self._index_crc = "crc32c" in index_names
            shard_shape = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
            if any(sh < s for sh, s in zip(shard_shape, self.shape)):
                raise PetctlError(f"{self.path}: expected one shard per array")
        else:
            self.chunks = tuple(int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"])
            inner = [c["name"] for c in codecs]
            self._index_crc = False
            shard_shape = None
        if inner[0] != "bytes" or any(n not in ("bytes", "blosc") for n in inner):
            raise PetctlError(f"{self.path}: unsupported codecs {inner}")
        self._blosc = "blosc" in inner
        self._sharded = shard_shape is not None
        self._grid = tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))
        sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        self._chunk_file = self.path / ("c" + sep + sep.join("0" for _ in self.shape))
        self._strides = tuple(int(v) for v in np.cumprod((1,) + self._grid[:0:-1])[::-1])
        self._index: list[tuple[int, int]] | None = None
        self._view: memoryview | None = None
        self._has_empty = True
        if required:  # mapped now: a case replaced later keeps being read whole from the file opened here
            self._open()

    def _open(self) -> None:
        if self._index is not None:
            return
        if self._required and not self._chunk_file.exists():
            raise PetctlError(f"{self.path}: its data file {self._chunk_file.name} is missing (a store copied in part, or the "
                              "case rewritten while read); run `petctl prepare` again")
        if not self._chunk_file.exists():
            self._index = [(_EMPTY, 0)] * int(np.prod(self._grid))
            self._has_empty = True
            return
        self._fd = os.open(self._chunk_file, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        self._mm = mmap.mmap(self._fd, size, access=mmap.ACCESS_READ)
        self._view = memoryview(self._mm)
        if self._sharded:
            n = int(np.prod(self._grid))
            nbytes = 16 * n + (4 if self._index_crc else 0)
            index_bytes = self._mm[size - nbytes : size - nbytes + 16 * n] if size >= nbytes else b""
            problem = None
            if size < nbytes:
                problem = f"{size} bytes, shorter than its index ({nbytes})"
            elif self._index_crc:
                import google_crc32c

                if google_crc32c.value(index_bytes) != int.from_bytes(self._mm[size - 4 : size], "little"):
                    problem = "its index fails its CRC32C"
            if problem is None:
                raw = np.frombuffer(index_bytes, dtype="<u8").reshape(n, 2)
                self._index = [(int(o), int(b)) for o, b in raw]  # plain ints: no numpy scalars per chunk read
                if any(o != _EMPTY and o + b > size - nbytes for o, b in self._index):
                    problem = "its index points past its data"
            if problem is not None:
                self.close()
                raise PetctlError(f"{self._chunk_file}: damaged shard ({problem}); run `petctl prepare` again")
        else:
            self._index = [(0, size)]
        self._has_empty = any(o == _EMPTY for o, _ in self._index)

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._index = None

    def _chunk(self, flat: int) -> np.ndarray | None:
        offset, nbytes = self._index[flat]  # type: ignore[index]
        if offset == _EMPTY:
            return None
        buf = self._view[offset : offset + nbytes]  # type: ignore[index]
        buf = _blosc.decompress(buf) if self._blosc else bytes(buf)  # never hand out views into the mapping
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.chunks)

    def read_all(self) -> np.ndarray:
        return self.read_box((0,) * len(self.shape), self.shape)

    def read_box(self, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        """Read the box [start, start+size) in the stored dtype; outside the array: 0."""
        self._open()
        inside = all(s >= 0 and s + n <= dim for s, n, dim in zip(start, size, self.shape))
        out = (np.empty if inside and not self._has_empty else np.zeros)(size, dtype=self.dtype)
        # per axis: (chunk index, source slice in the chunk, destination slice in `out`)
        axes = []
        for dim, s, n, c in zip(self.shape, start, size, self.chunks):
            lo, hi = max(0, s), min(dim, s + n)
            if hi <= lo:
                return out
            axes.append([(ci, slice(max(lo, ci * c) - ci * c, min(hi, (ci + 1) * c) - ci * c),
                          slice(max(lo, ci * c) - s, min(hi, (ci + 1) * c) - s)) for ci in range(lo // c, (hi - 1) // c + 1)])
        strides = self._strides
        for parts in itertools.product(*axes):
            flat = 0
            for (ci, _, _), st in zip(parts, strides):
                flat += ci * st
            chunk = self._chunk(flat)
            dst = tuple(p[2] for p in parts)
            if chunk is None:
                if self.fill_value:
                    out[dst] = self.fill_value
                continue
            out[dst] = chunk[tuple(p[1] for p in parts)]
        return out


_DTYPES = {"float16": "f2", "float32": "f4", "uint8": "u1", "int32": "i4", "int16": "i2", "bool": "?"}


def _read_json(path: Path) -> dict[str, Any]:
    from petctl.engine.registry import read_json as read_retrying

    try:
        return read_retrying(Path(path))
    except FileNotFoundError:
        raise PetctlError(f"{path}: missing (is this a prepared petctl store?)") from None
    except json.JSONDecodeError as exc:
        raise PetctlError(f"{path}: corrupt JSON ({exc.msg})") from None


def _fsync_tree(root: Path) -> None:
    """Flush every file of a freshly written case before it is renamed into place."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def iter_chunk_files(root: Path) -> Iterator[Path]:
    """Every file of a store (for size and file-count reporting)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            yield Path(dirpath) / name


def read_json(path: Path) -> dict[str, Any]:
    """A stage's JSON file, or one clear PetctlError when it is missing or corrupt."""
    return _read_json(path)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Temp file + fsync + rename (the registry's writer): readers never see a partial file."""
    from petctl.engine.registry import write_json_atomic as write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write(Path(path), payload)


