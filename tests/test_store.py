"""The store's fast reader returns exactly what zarr-python reads; writes are atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from petctl.engine.store import CaseStore


@pytest.fixture()
def case_store(tmp_path: Path) -> CaseStore:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 70, 45, 81)).astype(np.float32)
    image[:, :20] = 0.0  # whole empty chunks: not written by zarr, must read as fill value
    label = (rng.random((70, 45, 81)) > 0.98).astype(np.uint8)
    s = CaseStore(tmp_path / "store")
    s.save("c1", image, label, np.array([[0, 1, 2, 3]]), np.array([[4, 5, 6]]), {"hello": 1})
    return s


@pytest.mark.parametrize(
    "start,size",
    [((0, 0, 0), (96, 96, 96)), ((-20, -5, 30), (48, 48, 48)), ((30, 10, 40), (32, 32, 32)), ((69, 44, 80), (8, 8, 8)), ((100, 0, 0), (4, 4, 4)), ((5, 7, 9), (1, 1, 1))],
)
def test_read_patch_equals_zarr_python(case_store: CaseStore, start, size):
    image, label = case_store.read_patch("c1", start, size)
    group = zarr.open_group(str(case_store.case_path("c1")), mode="r")
    ref_img = np.zeros((2, *size), np.float16)
    ref_lab = np.zeros(size, np.uint8)
    shape = group["label"].shape
    lo = [max(0, s) for s in start]
    hi = [min(d, s + n) for d, s, n in zip(shape, start, size)]
    if all(h > l for l, h in zip(lo, hi)):
        dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
        src = tuple(slice(l, h) for l, h in zip(lo, hi))
        ref_img[(slice(None), *dst)] = group["image"][(slice(None), *src)]
        ref_lab[dst] = group["label"][src]
    assert image.dtype == np.float16 and image.shape == (2, *size)
    assert np.array_equal(image, ref_img)
    assert np.array_equal(label, ref_lab)


def test_case_is_few_files_and_attrs_round_trip(case_store: CaseStore):
    path = case_store.case_path("c1")
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len(files) <= 10
    stored = case_store.load("c1")
    assert stored.attrs["hello"] == 1
    assert stored.lesion_coords.tolist() == [[0, 1, 2, 3]]
    assert stored.body_coords.tolist() == [[4, 5, 6]]
    assert case_store.list() == ["c1"]


def test_failed_write_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    s = CaseStore(tmp_path / "store")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("petctl.engine.store._fsync_tree", boom)
    with pytest.raises(OSError):
        s.save("c2", np.zeros((2, 8, 8, 8)), np.zeros((8, 8, 8)), np.zeros((0, 4)), np.zeros((0, 3)), {})
    assert s.list() == []
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "store" / "cases").iterdir())


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden"])
def test_case_ids_cannot_escape(tmp_path: Path, bad: str):
    from petctl.errors import PetctlError

    with pytest.raises(PetctlError):
        CaseStore(tmp_path).case_path(bad)


def test_a_missing_data_file_is_an_error_not_zeros(case_store: CaseStore):
    """The image's (and a case with lesions, its label's) data file is opened when the case is: a
    store copied in part fails there, in one line, instead of handing out patches of zeros; a file
    replaced after the case was opened keeps being read whole from the one opened."""
    from petctl.errors import PetctlError

    path = case_store.case_path("c1")
    before = case_store.read_patch("c1", (30, 10, 40), (8, 8, 8))[0]
    (path / "image" / "c" / "0" / "0" / "0" / "0").rename(path / "image.bak")
    assert np.array_equal(case_store.read_patch("c1", (30, 10, 40), (8, 8, 8))[0], before)  # opened already
    fresh = CaseStore(case_store.root)
    with pytest.raises(PetctlError, match="image: its data file 0 is missing .*run `petctl prepare` again"):
        fresh.load("c1")
    (path / "image.bak").rename(path / "image" / "c" / "0" / "0" / "0" / "0")
    (path / "label" / "c" / "0" / "0" / "0").unlink()  # c1 has lesions: its label must be there
    with pytest.raises(PetctlError, match="label: its data file 0 is missing"):
        CaseStore(case_store.root).load("c1")


@pytest.mark.parametrize("damage", ["index_byte", "truncated"])
def test_a_damaged_shard_is_an_error_not_garbage(case_store: CaseStore, damage: str):
    """The shard index's CRC32C (written with it) is checked when the shard is opened, and a shard
    cut short is refused: one line naming the file, instead of chunks read from wrong offsets."""
    from petctl.errors import PetctlError

    shard = case_store.case_path("c1") / "image" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    if damage == "index_byte":
        data[-10] ^= 0xFF  # inside the index, before its CRC
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    with pytest.raises(PetctlError, match="damaged shard .*run `petctl prepare` again"):
        CaseStore(case_store.root).load("c1")
