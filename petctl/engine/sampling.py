"""Training patches: where to centre them, how ranks and workers share cases, and batch augmentation.

Three layers, from pure to stateful:
- `patch_centre` / `patch_start` are pure: coordinates and a `np.random.Generator` in, a patch
  position out. A lesion-centred draw picks a lesion *component* uniformly and then one of its
  sampled voxels, so a case's tiny lesions are seen as often as its big ones (or, with
  `lesion_size_power` p > 0, with weight voxels ** p, so big lesions are seen more often).
  With `hard_lesion_gain` g > 0 a component's weight is also multiplied by 1 + g·h, where h is how
  much the net missed in the patches centred on it so far (`update_hardness`; the recall of a patch
  is over all its lesion voxels, so a neighbour found or missed in the same patch counts too):
  hard-example mining per lesion, so a large hot lesion the net calls physiology is shown again until it is not.
- `SegPatchDataset` streams patches from a `CaseStore`: each epoch the case list is shuffled the
  same way on every rank, padded to a multiple of the world size and dealt out `[rank::world]`;
  within a rank, DataLoader workers split the cases again. A case is opened once and yields
  `patches_per_scan` patches. Every random draw comes from a generator keyed by
  (seed, epoch, rank, position of the case in the epoch), so runs repeat exactly and no two ranks
  or workers draw the same patches; the patches do not depend on the number of workers.
- `augment_batch` augments a whole batch on whatever device it lives on (flips, one affine
  sampling grid + `grid_sample` for rotation/zoom of image and label together, intensity
  scale/shift), so the GPU does the expensive resampling instead of the CPU loader workers.
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from petctl.engine.store import LESION_CONNECTIVITY, CaseStore
from petctl.errors import PetctlError

# Domain tags keep the shuffle stream and the per-case patch streams apart.
_SHUFFLE_STREAM, _PATCH_STREAM = 0, 1


# -- pure sampling -----------------------------------------------------------------------------
def patch_centre(
    stored_shape: Sequence[int],
    lesion_coords: np.ndarray,
    body_coords: np.ndarray,
    lesion_prob: float,
    rng: np.random.Generator,
    component_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """(centre_xyz int64 (3,), component) for one patch of a case: the lesion component the patch is
    centred on, or -1 when it is not lesion-centred.

    With probability `lesion_prob` (only when the case has lesion coordinates) a lesion component
    is chosen — uniformly, or in proportion to `component_weights[component]` when given — then
    one of its sampled voxels uniformly; otherwise a body voxel, or any voxel of the volume when
    the case has no body samples.
    """
    # Always consume the coin so that the rest of the stream does not depend on the case type.
    coin = rng.random()
    if len(lesion_coords) and coin < lesion_prob:
        components = lesion_coords[:, 0]
        labels = np.unique(components)
        if component_weights is None:
            chosen = labels[rng.integers(len(labels))]
        else:
            weights = np.asarray(component_weights, dtype=np.float64)[labels]
            chosen = labels[rng.choice(len(labels), p=weights / weights.sum())]
        rows = np.flatnonzero(components == chosen)
        return lesion_coords[rows[rng.integers(len(rows))], 1:4].astype(np.int64), int(chosen)
    if len(body_coords):
        return body_coords[rng.integers(len(body_coords))].astype(np.int64), -1
    return rng.integers(0, np.asarray(stored_shape, dtype=np.int64)), -1


def patch_start(
    centre_xyz: np.ndarray,
    patch_size: Sequence[int],
    jitter: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[int, int, int]:
    """Corner of the patch around `centre_xyz`, shifted by up to ±jitter·size per axis.

    The box may start below zero or run past the volume: `CaseStore.read_patch` fills the outside
    with zeros. Jitter keeps lesions from always sitting at the patch centre; with jitter ≤ 0.5
    the centre voxel stays inside the patch.
    """
    size = np.asarray(patch_size, dtype=np.int64)
    start = np.asarray(centre_xyz, dtype=np.int64) - size // 2
    if jitter > 0:
        if rng is None:
            raise ValueError("patch_start: jitter needs an rng")
        reach = np.floor(size * jitter).astype(np.int64)
        # the centre sits at size // 2 in the patch: a shift in [-(size - 1 - size // 2), size // 2] keeps it in
        low, high = np.minimum(reach, size - 1 - size // 2), np.minimum(reach, size // 2)
        start = start + rng.integers(-low, high + 1)
    return tuple(int(s) for s in start)  # type: ignore[return-value]


def batches_per_epoch(num_cases: int, world_size: int, patches_per_scan: int, batch_size: int, num_workers: int) -> int:
    """Batches a `make_loader` loader yields per epoch on each of `world_size` ranks sharing `num_cases`
    scans: each worker ends with its own partial batch (also the demo's budget, before any loader exists)."""
    per_rank = math.ceil(num_cases / world_size)
    shares = [len(range(w, per_rank, num_workers)) for w in range(num_workers)] if num_workers > 0 else [per_rank]
    return sum(math.ceil(n * patches_per_scan / batch_size) for n in shares)


def epoch_cases(cases: Sequence[str], epoch: int, seed: int, world_size: int) -> list[str]:
    """The epoch's case order, identical on every rank, padded (cyclically) to a multiple of world_size."""
    order = np.random.default_rng([seed, epoch, _SHUFFLE_STREAM]).permutation(len(cases))
    padded = np.resize(order, math.ceil(len(cases) / world_size) * world_size)
    return [cases[i] for i in padded]


# -- dataset -----------------------------------------------------------------------------------
class SegPatchDataset(IterableDataset):
    """Streams {"image" (C,*patch) f32, "label" (1,*patch) f32, "case", "lesion", "start" and "shape"
    (3,) int64: the patch's corner and the stored volume's size, for the position channels} dicts for one rank."""

    def __init__(
        self,
        store_root: str,
        cases: list[str],
        patch_size: tuple[int, int, int],
        patches_per_scan: int,
        lesion_prob: float = 2 / 3,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        jitter: float = 0.25,
        lesion_size_power: float = 0.0,
        hard_lesion_gain: float = 0.0,
        hard_momentum: float = 0.5,
    ) -> None:
        if not cases:
            raise PetctlError("no training cases to sample patches from")
        if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
            raise PetctlError(f"patch size must be three positive voxel counts, got {patch_size}")
        if patches_per_scan < 1:
            raise PetctlError("patches per scan must be at least 1")
        if not 0.0 <= lesion_prob <= 1.0:
            raise PetctlError(f"lesion probability must be in [0, 1], got {lesion_prob}")
        if not 0 <= rank < world_size:
            raise PetctlError(f"rank {rank} is not in [0, {world_size})")
        if not 0.0 <= jitter <= 0.5:
            raise PetctlError(f"jitter must be in [0, 0.5] (fraction of the patch), got {jitter}")
        if seed < 0:
            raise PetctlError("seed must be non-negative")
        if lesion_size_power < 0:
            raise PetctlError(f"lesion size power must be ≥ 0, got {lesion_size_power}")
        if hard_lesion_gain < 0:
            raise PetctlError(f"hard lesion gain must be ≥ 0, got {hard_lesion_gain}")
        if not 0.0 <= hard_momentum < 1.0:
            raise PetctlError(f"hard-example momentum must be in [0, 1), got {hard_momentum}")
        self.store_root = str(store_root)
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.patches_per_scan = int(patches_per_scan)
        self.lesion_prob = float(lesion_prob)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.jitter = float(jitter)
        self.lesion_size_power = float(lesion_size_power)
        self._component_weights: dict[str, np.ndarray] = {}
        # Shared memory so that persistent DataLoader workers (which hold their own copy of the
        # dataset) see `set_epoch` calls made in the main process.
        self._epoch: Any = multiprocessing.Value("q", 0, lock=False)
        self._store: CaseStore | None = None
        self.hard_lesion_gain = float(hard_lesion_gain)
        self.hard_momentum = float(hard_momentum)
        # Per lesion component of every case: how much of it the net missed (0 found … 1 missed),
        # in shared memory for the same reason as the epoch; `_hard_offset[case]` is its first slot.
        self._hard_offset: dict[str, int] = {}
        self._hard_count: dict[str, int] = {}
        self._hardness: Any = None
        if self.hard_lesion_gain > 0:
            store = CaseStore(self.store_root)
            total = 0
            for case in self.cases:
                coords = store.load(case).lesion_coords
                self._hard_offset[case] = total
                self._hard_count[case] = int(coords[:, 0].max()) + 1 if len(coords) else 0
                total += self._hard_count[case]
            store.close()
            self._hardness = multiprocessing.Array("d", max(total, 1), lock=False)

    @property
    def epoch(self) -> int:
        return int(self._epoch if isinstance(self._epoch, int) else self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating the loader for that epoch (also works with persistent workers)."""
        if isinstance(self._epoch, int):
            self._epoch = int(epoch)
        else:
            self._epoch.value = int(epoch)

    def patches_per_epoch_per_rank(self) -> int:
        """Patches every rank yields per epoch (the same on all ranks, whatever the worker split)."""
        return math.ceil(len(self.cases) / self.world_size) * self.patches_per_scan

    def batches_per_epoch_per_rank(self, batch_size: int, num_workers: int) -> int:
        """Batches a `make_loader` loader yields per epoch (`batches_per_epoch`)."""
        return batches_per_epoch(len(self.cases), self.world_size, self.patches_per_scan, batch_size, num_workers)

    def rank_cases(self, epoch: int | None = None) -> list[tuple[int, str]]:
        """(position in the epoch, case) pairs this rank reads in `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        ordered = epoch_cases(self.cases, epoch, self.seed, self.world_size)
        return list(enumerate(ordered))[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        if self._store is None:
            self._store = CaseStore(self.store_root)
        for position, case in self.rank_cases(epoch)[worker::num_workers]:
            rng = np.random.default_rng([self.seed, epoch, _PATCH_STREAM, self.rank, position])
            yield from self._case_patches(case, rng)

    def _case_patches(self, case: str, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        stored = self._store.load(case)  # type: ignore[union-attr]
        weights = self.sampling_weights(case, stored)
        for _ in range(self.patches_per_scan):
            centre, component = patch_centre(stored.shape, stored.lesion_coords, stored.body_coords, self.lesion_prob, rng, weights)
            start = patch_start(centre, self.patch_size, self.jitter, rng)
            image, label = self._store.read_patch(case, start, self.patch_size)  # type: ignore[union-attr]
            yield {
                "image": torch.from_numpy(image).float(),
                "label": torch.from_numpy(label).float().unsqueeze(0),
                "case": case,
                "lesion": component >= 0,
                "component": component,
                "start": torch.tensor(start, dtype=torch.int64),
                "shape": torch.tensor(stored.shape, dtype=torch.int64),
            }

    def sampling_weights(self, case: str, stored: Any) -> np.ndarray | None:
        """The weights a lesion-centred draw of `case` picks its components by (None: uniform)."""
        if not len(stored.lesion_coords) or (self.lesion_size_power <= 0 and self.hard_lesion_gain <= 0):
            return None
        num_components = int(stored.lesion_coords[:, 0].max()) + 1
        weights = self.component_weights(case, stored) if self.lesion_size_power > 0 else np.ones(num_components)
        if self.hard_lesion_gain > 0:
            weights = weights * (1.0 + self.hard_lesion_gain * self.hardness(case, num_components))
        return weights

    def hardness(self, case: str, num_components: int | None = None) -> np.ndarray:
        """Per lesion component of `case`: the running miss rate (0 before its first patch)."""
        if self._hardness is None:
            raise PetctlError("hard-example sampling is off (hard_lesion_gain is 0)")
        if case not in self._hard_offset:
            raise PetctlError(f"{case}: not one of this dataset's training cases")
        count = self._hard_count[case]
        if num_components is not None and num_components != count:
            raise PetctlError(f"{case}: {num_components} lesion components asked for, the store has {count}; re-run `petctl prepare`")
        offset = self._hard_offset[case]
        return np.array(self._hardness[offset : offset + count], dtype=np.float64)

    def update_hardness(self, records: Sequence[tuple[str, int, float]]) -> None:
        """Fold (case, component, recall in a patch centred on it) records into the running miss
        rates: h ← m·h + (1 − m)·(1 − recall), in the order given (give every rank the same order)."""
        if self._hardness is None:
            return
        m = self.hard_momentum
        for case, component, recall in records:
            if case not in self._hard_offset or not 0 <= int(component) < self._hard_count[case] or not 0.0 <= recall <= 1.0:
                continue
            slot = self._hard_offset[case] + int(component)
            self._hardness[slot] = m * self._hardness[slot] + (1.0 - m) * (1.0 - float(recall))

    def hardness_state(self) -> dict[str, list[float]] | None:
        """The running miss rates per case (for a checkpoint), or None when the sampling is off."""
        if self._hardness is None:
            return None
        return {case: self.hardness(case).tolist() for case in self._hard_offset}

    def load_hardness_state(self, state: dict[str, list[float]] | None) -> None:
        """Restore `hardness_state()` (a resumed run samples as the interrupted one would have)."""
        if self._hardness is None or not state:
            return
        for case, values in state.items():
            if case in self._hard_offset and len(values) == self._hard_count[case]:
                offset = self._hard_offset[case]
                self._hardness[offset : offset + len(values)] = [float(v) for v in values]

    def component_weights(self, case: str, stored: Any) -> np.ndarray:
        """Per lesion component of `case`: its voxel count ** `lesion_size_power` (cached).

        Components are numbered as prepare numbered them: the same `LESION_CONNECTIVITY` labelling
        of the same stored label, in scan order."""
        if case not in self._component_weights:
            import cc3d

            components, num_components = cc3d.connected_components(stored.label.read_all(), connectivity=LESION_CONNECTIVITY, return_N=True)
            if num_components != int(stored.lesion_coords[:, 0].max()) + 1:
                raise PetctlError(f"{case}: the stored label has {num_components} lesion components, its lesion samples "
                                  f"{int(stored.lesion_coords[:, 0].max()) + 1}; re-run `petctl prepare`")
            voxels = np.bincount(components.ravel(), minlength=num_components + 1)[1:]
            self._component_weights[case] = voxels.astype(np.float64) ** self.lesion_size_power
        return self._component_weights[case]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None  # each process opens its own files
        if get_spawning_popen() is None and not isinstance(self._epoch, int):
            # Shared memory only travels to a process being started; any other copy gets a value.
            state["_epoch"] = self.epoch
            if self._hardness is not None:
                state["_hardness"] = list(self._hardness)
        return state


def _init_worker(worker_id: int) -> None:
    # Loader workers run side by side; intra-op threads in each would oversubscribe the cores.
    torch.set_num_threads(1)


def make_loader(
    dataset: SegPatchDataset,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader over `dataset`; workers persist across epochs so open shards stay cached."""
    if batch_size < 1 or num_workers < 0:
        raise PetctlError("batch size must be ≥ 1 and the number of loader workers ≥ 0")
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        worker_init_fn=_init_worker if workers else None,
    )


# -- batched augmentation ----------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample random augmentation applied to a whole batch on its device."""

    enabled: bool = True
    """False: `augment_batch` returns its inputs unchanged (validation, debugging)."""
    p_flip: float = 0.5
    """Probability of a flip, drawn independently for each spatial axis of each sample."""
    flip_axes: tuple[int, ...] = (0, 1, 2)
    """Spatial axes that may be flipped (the MIP classifier flips left-right only: a body upside
    down or back to front is not a view it will ever be shown)."""
    p_affine: float = 0.5
    """Probability that a sample is rotated and zoomed (one draw per sample covers both)."""
    max_rotation_deg: float = 15.0
    """Rotation about each axis is uniform in ±this many degrees (voxel space, like MONAI/nnU-Net)."""
    zoom_range: tuple[float, float] = (0.85, 1.25)
    """Isotropic zoom factor range; > 1 enlarges the content (zooms in)."""
    p_intensity: float = 0.5
    """Probability, per sample and channel, of the intensity scale and shift below."""
    intensity_scale: float = 0.1
    """Intensities are multiplied by U(1 - s, 1 + s)."""
    intensity_shift: float = 0.1
    """Then shifted by U(-s, s) (z-score units)."""
    p_lesion_dim: float = 0.0
    """Probability, per sample with lesion voxels, that its lesions are dimmed (`dim_lesions`): their
    uptake above the surrounding tissue is multiplied by U(`lesion_dim_min`, 1) in the
    `lesion_dim_channels`, so the net also sees each lesion as a fainter one. 0: off (the paper)."""
    lesion_dim_min: float = 0.5
    lesion_dim_channels: tuple[int, ...] = (1,)
    """The PET channels a dimming acts on (the clipped PET; the wide PET too when stored)."""
    lesion_dim_contrast: float = 1.5
    """A dimmed lesion's peak stays at least this many times the uptake around it, in SUV (the first
    of `lesion_dim_channels` mapped back by `lesion_dim_suv`): a lesion in soft tissue may become
    as faint as the cohort's faintest, one in the liver stays clear of the liver's own texture."""
    lesion_dim_suv: tuple[float, float] | None = None
    """(mean, std) that map the first dimmed channel's z-scores back to SUV (the store's PET
    normalization); None: no contrast floor."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_lesion_dim <= 1.0 or not 0.0 <= self.lesion_dim_min <= 1.0 or self.lesion_dim_contrast < 1.0:
            raise PetctlError(f"augmentation lesion dimming: probability and minimum factor must be in [0, 1], the contrast "
                              f"at least 1 (got {self.p_lesion_dim}, {self.lesion_dim_min}, {self.lesion_dim_contrast})")
        for name in ("p_flip", "p_affine", "p_intensity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PetctlError(f"augmentation {name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.zoom_range
        if not 0 < lo <= hi:
            raise PetctlError(f"augmentation zoom range must satisfy 0 < low ≤ high, got {self.zoom_range}")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise PetctlError(f"augmentation flip axes must be among 0, 1, 2, got {self.flip_axes}")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise PetctlError("augmentation rotation must be in [0, 180] degrees")
        if not 0.0 <= self.intensity_scale < 1.0 or self.intensity_shift < 0:
            raise PetctlError("augmentation intensity scale must be in [0, 1) and shift ≥ 0")


def augment_batch(
    image_bcxyz: torch.Tensor,
    label_b1xyz: torch.Tensor,
    generator: torch.Generator,
    cfg: AugmentConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch; image and label receive the same spatial transform.

    Rotation/zoom resample image and label in one `grid_sample` call (trilinear, zeros outside,
    like `read_patch`), the label being thresholded at 0.5 afterwards, so a label voxel is set
    exactly where an image channel equal to the label would be ≥ 0.5. Every sample consumes the
    same amount of randomness whatever is applied, so results depend only on the generator state.
    Parameters are drawn on the generator's device (a CPU generator is cheapest) and moved over.
    """
    if not cfg.enabled:
        return image_bcxyz, label_b1xyz
    batch, channels = image_bcxyz.shape[:2]
    u = torch.rand(batch, 8 + 3 * channels, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    if cfg.p_lesion_dim > 0:  # drawn after the rest, so runs without dimming keep their random stream
        d = torch.rand(batch, 2, generator=generator, device=generator.device, dtype=torch.float64).cpu()
        factors = [cfg.lesion_dim_min + float(b) * (1 - cfg.lesion_dim_min) if float(a) < cfg.p_lesion_dim else None
                   for a, b in d.tolist()]
        image_bcxyz = dim_lesions(image_bcxyz, label_b1xyz, factors, cfg.lesion_dim_channels,
                                  contrast=(cfg.lesion_dim_contrast, cfg.lesion_dim_suv) if cfg.lesion_dim_suv else None)
    allowed = torch.tensor([a in cfg.flip_axes for a in range(3)])
    flips = ((u[:, 0:3] < cfg.p_flip) & allowed).tolist()
    affine = u[:, 3] < cfg.p_affine
    angles = (u[:, 4:7] * 2 - 1) * math.radians(cfg.max_rotation_deg)
    zoom = cfg.zoom_range[0] + u[:, 7] * (cfg.zoom_range[1] - cfg.zoom_range[0])
    intensity = u[:, 8 : 8 + channels] < cfg.p_intensity
    scale = 1 + (u[:, 8 + channels : 8 + 2 * channels] * 2 - 1) * cfg.intensity_scale
    shift = (u[:, 8 + 2 * channels :] * 2 - 1) * cfg.intensity_shift

    # Samples that are resampled anyway get their flips folded into the sampling matrix (free);
    # the others are flipped by copying.
    image, label = _flip_each(image_bcxyz, label_b1xyz, [f if not a else [False] * 3 for f, a in zip(flips, affine.tolist())])
    if affine.any():
        idx = torch.nonzero(affine).squeeze(1)
        signs = 1 - 2 * torch.tensor(flips, dtype=torch.float64)[idx]
        theta = _affine_theta(angles[idx], zoom[idx], signs, image.shape[2:])
        dev_idx = idx.to(image.device)
        # half-precision grids would misplace samples by up to ~0.5 voxel on a 96-voxel axis
        work = torch.float32 if image.dtype in (torch.float16, torch.bfloat16) else image.dtype
        both = torch.cat([image.index_select(0, dev_idx).to(work), label.index_select(0, dev_idx).to(work)], dim=1)
        grid = _affine_grid(theta.to(device=image.device, dtype=work), image.shape[2:])
        moved = torch.nn.functional.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        image = image.index_copy(0, dev_idx, moved[:, :channels].to(image.dtype))
        label = label.index_copy(0, dev_idx, (moved[:, channels:] >= 0.5).to(label.dtype))
    if intensity.any():
        view = (batch, channels) + (1,) * (image.dim() - 2)
        gain = torch.where(intensity, scale, torch.ones_like(scale)).reshape(view).to(image.device, image.dtype)
        offset = torch.where(intensity, shift, torch.zeros_like(shift)).reshape(view).to(image.device, image.dtype)
        image = torch.addcmul(offset, image, gain)
    return image, label


DIM_RING = (3, 5)
"""The surrounding tissue a dimming measures: voxels 4-5 voxels (Chebyshev) from a lesion."""


def dim_lesions(image_bcxyz: torch.Tensor, label_b1xyz: torch.Tensor, factors: Sequence[float | None],
                channels: Sequence[int], contrast: tuple[float, tuple[float, float]] | None = None) -> torch.Tensor:
    """Each sample's lesions made fainter in `channels`: image − (1 − factor) · w · max(image − bg, 0),
    where bg is the median of the channel over a ring of tissue around the lesions (`DIM_RING`) and
    w is 1 over the lesions and one voxel around them, 2/3 and 1/3 two and three out, 0 from four (the scanner's
    blur spreads a lesion's uptake past its label). The label is unchanged: a fainter lesion is
    still a lesion. A sample without lesion voxels or without a ring (the lesion fills the patch),
    or with factor None, is left as it is. `contrast` = (c, (mean, std)): the factor is raised so
    that the lesion's peak stays at least c times the tissue's uptake, both mapped to SUV from the
    first channel (z · std + mean). Returns a new tensor when any sample is dimmed."""
    picked = [i for i, f in enumerate(factors) if f is not None and f < 1]
    if not picked or not channels:
        return image_bcxyz
    lesion = (label_b1xyz.index_select(0, torch.tensor(picked, device=label_b1xyz.device)) > 0.5).float()
    inner = _dilate(lesion, DIM_RING[0])
    ring = (_dilate(inner, DIM_RING[1] - DIM_RING[0]) > 0) & ~(inner > 0)
    weight = torch.nn.functional.avg_pool3d(_dilate(lesion, 2), 3, stride=1, padding=1, count_include_pad=False)
    out = image_bcxyz.clone()
    for j, i in enumerate(picked):
        if not bool(ring[j].any()):  # no lesion, or a lesion that fills the patch
            continue
        factor = float(factors[i])
        if contrast is not None:
            ratio, (mean, std) = contrast
            pet = out[i, channels[0]]
            bg_suv = float(pet[ring[j, 0]].median()) * std + mean
            excess = float(pet[lesion[j, 0] > 0].max()) * std + mean - bg_suv
            if excess <= 0:
                continue
            factor = max(factor, (ratio - 1) * max(bg_suv, 0.0) / excess)
            if factor >= 1:
                continue
        w = weight[j, 0].to(out.dtype)
        for c in channels:
            values = out[i, c]
            bg = values[ring[j, 0]].median()
            out[i, c] = values - (1 - factor) * w * torch.clamp(values - bg, min=0)
    return out


def _dilate(mask_b1xyz: torch.Tensor, radius: int) -> torch.Tensor:
    """A float mask dilated by a (2·radius + 1)³ cube, one axis at a time (a cube is separable)."""
    for kernel in ((2 * radius + 1, 1, 1), (1, 2 * radius + 1, 1), (1, 1, 2 * radius + 1)):
        mask_b1xyz = torch.nn.functional.max_pool3d(mask_b1xyz, kernel, stride=1, padding=tuple(k // 2 for k in kernel))
    return mask_b1xyz


def _flip_each(image: torch.Tensor, label: torch.Tensor, flips: list[list[bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample flips; samples without a flip are not copied twice."""
    if not any(any(f) for f in flips):
        return image, label
    images, labels = [], []
    for b, axes in enumerate(flips):
        dims = [d + 1 for d, on in enumerate(axes) if on]
        images.append(image[b].flip(dims) if dims else image[b])
        labels.append(label[b].flip(dims) if dims else label[b])
    return torch.stack(images), torch.stack(labels)


def _affine_theta(angles_b3: torch.Tensor, zoom_b: torch.Tensor, signs_b3: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """(B, 3, 4) `affine_grid` matrices: flip (signs ±1 per x, y, z), then rotate and zoom about the
    patch centre, in voxel space.

    `angles_b3` are radians about x, y, z. `affine_grid` works in normalized coordinates
    ([-1, 1] per axis, ordered W, H, D = z, y, x);
    conjugating with the half-extents makes the rotation rigid in voxel units for non-cubic patches.
    """
    cos, sin = torch.cos(angles_b3), torch.sin(angles_b3)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def rot(c: torch.Tensor, s: torch.Tensor, i: int, j: int) -> torch.Tensor:
        m = torch.stack([one, zero, zero, zero, one, zero, zero, zero, one], dim=1).reshape(-1, 3, 3).clone()
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
        return m

    # angles[:, k] turns about axis k of (x, y, z); reversing rows and columns reorders to (z, y, x)
    r = rot(cos[:, 0], sin[:, 0], 1, 2) @ rot(cos[:, 1], sin[:, 1], 0, 2) @ rot(cos[:, 2], sin[:, 2], 0, 1)
    r = r.flip([1, 2])
    half = torch.tensor([max(n - 1, 1) / 2 for n in reversed(tuple(spatial))], dtype=r.dtype)
    linear = (r * half[None, None, :] / half[None, :, None]) / zoom_b[:, None, None] * signs_b3.flip(1)[:, :, None]
    return torch.cat([linear, torch.zeros(len(r), 3, 1, dtype=r.dtype)], dim=2)


def _affine_grid(theta: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """`F.affine_grid(theta, size, align_corners=True)` by broadcasting three axis ramps.

    The affine map is separable, so the grid is a sum of outer products; on the CPU this is ~4×
    faster than `affine_grid`'s (D·H·W, 4) × (4, 3) matmul per sample (one full-size write).
    """
    d, h, w = (torch.linspace(-1, 1, n, device=theta.device, dtype=theta.dtype) if n > 1 else torch.zeros(1, device=theta.device, dtype=theta.dtype) for n in spatial)
    t = theta[:, None, None, None, :, :]  # (B, 1, 1, 1, 3 outputs, 4 inputs)
    # small (B, 1, H, W, 3) plane first, so only the last sum writes the full grid
    plane = (t[..., 0] * w[None, None, None, :, None] + t[..., 3]) + t[..., 1] * h[None, None, :, None, None]
    return plane + t[..., 2] * d[None, :, None, None, None]
