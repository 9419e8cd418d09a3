"""Fashion-MNIST and the FMNIST-C continual stream (DESIGN.md §10). numpy only: no torch here.

Data comes from Debian's ``dataset-fashion-mnist`` (gzipped idx files under ``/usr/share/datasets/fashion-mnist``,
overridable with ``EDGEADAPT_FMNIST_DIR``). Images are padded 28 -> 32 with 2 zero pixels per side.

The stream: for each of the 15 common corruptions of ``imagecorruptions-imaug`` in the standard ImageNet-C order,
the first ``per_corruption`` test images corrupted at ``severity``, concatenated = one continual stream.

How the gray images meet the library (which always works on H x W x 3 uint8, at least 32 x 32):

- The 32 x 32 padded image is stacked to 3 channels, corrupted, and **channel 0** is kept. All 15 corruptions
  run at 32 x 32 as they are: nothing is upscaled or cropped by us. (``frost`` crops a random 32 x 32 window
  out of its large frost photo itself; ``motion_blur`` stops its kernel at the image border itself;
  ``pixelate`` at severity 5 goes through 8 x 8.) Channel 0 rather than the channel mean because the noise
  corruptions draw independent noise per channel: a mean would shrink the noise std by sqrt(3), i.e. lower
  the severity. Every other corruption leaves the 3 channels equal, except ``frost`` whose overlay is
  colored: we get the frost photo's red channel there.
- Determinism: before each chunk of ``CHUNK`` images we seed numpy's global RNG and python's ``random`` from
  ``SeedSequence([seed, index of the corruption in CORRUPTIONS, chunk index])``. ``glass_blur`` and
  ``impulse_noise`` ignore the global RNG unless given a ``seed`` (``glass_blur`` seeds numba's RNG,
  ``impulse_noise`` skimage's ``rng``), so they get a per-image seed drawn from the seeded global RNG.
  Hence a build is bit-identical for a seed whatever the number of worker processes, a corruption's images
  do not depend on which other corruptions are built, and a smaller ``per_corruption`` is a prefix of a
  larger one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

#: images per seeded chunk (fixed: changing it changes the stream for a seed)
CHUNK = 250
#: below this many images a build runs in-process (worker start-up costs ~1-4 s: imports, numba compile)
_MIN_IMAGES_FOR_POOL = 1500

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class FMNISTMissingError(FileNotFoundError):
    """The Fashion-MNIST idx files are not where we looked."""


def default_cache_dir() -> Path:
    """``$EDGEADAPT_CACHE`` or ``~/.cache/edgeadapt``."""
    env = os.environ.get("EDGEADAPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgeadapt"


def fmnist_dir() -> Path:
    """``$EDGEADAPT_FMNIST_DIR`` or Debian's ``/usr/share/datasets/fashion-mnist``."""
    env = os.environ.get("EDGEADAPT_FMNIST_DIR")
    return Path(env).expanduser() if env else DEFAULT_FMNIST_DIR


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FMNISTMissingError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. Install Debian's package "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or run scripts/setup, "
        f"or point EDGEADAPT_FMNIST_DIR at a folder holding the idx files."
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise ValueError(f"{path}: header says {dims} ({count} bytes) but holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fmnist(split: str = "test", directory: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split: images uint8 ``[N, 1, 32, 32]`` (28 x 28 padded with 2 zero pixels per
    side) and labels int64 ``[N]``."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    d = Path(directory) if directory is not None else fmnist_dir()
    img_stem, lbl_stem = _FILES[split]
    images = _read_idx(_find_idx(d, img_stem))
    labels = _read_idx(_find_idx(d, lbl_stem)).astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{d}: {split} images {images.shape} do not match labels {labels.shape}")
    x = np.zeros((images.shape[0], 1, images.shape[1] + 4, images.shape[2] + 4), dtype=np.uint8)
    x[:, 0, 2:-2, 2:-2] = images
    return x, labels


def _corruption_hash(corruptions: Sequence[str]) -> str:
    return hashlib.sha256(",".join(corruptions).encode()).hexdigest()[:8]


def stream_filename(severity: int = 5, per_corruption: int = 2000, corruptions: Sequence[str] = CORRUPTIONS,
                    seed: int = 0) -> str:
    """File name of a stream build inside its output folder."""
    return f"fmnist_c_s{severity}_n{per_corruption}_seed{seed}_{_corruption_hash(list(corruptions))}.npz"


def validate_corruptions(corruptions: Sequence[str]) -> list[str]:
    names = [c.strip() for c in corruptions]
    bad = [c for c in names if c not in CORRUPTIONS]
    if bad:
        raise ValueError(f"unknown corruption(s) {', '.join(map(repr, bad))}; valid: {', '.join(CORRUPTIONS)}")
    if not names:
        raise ValueError(f"no corruption given; valid: {', '.join(CORRUPTIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"corruption list has duplicates: {names}")
    return names


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_clean(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``fmnist_train.npz`` and ``fmnist_test.npz`` (x uint8 [N,1,32,32], y int64) once."""
    out = Path(out_dir)
    paths = (out / "fmnist_train.npz", out / "fmnist_test.npz")
    for split, path in zip(("train", "test"), paths, strict=True):
        if not path.exists():
            x, y = load_fmnist(split)
            _atomic_savez(path, x=x, y=y)
    return paths


def _chunk_seed(seed: int, corruption_index: int, chunk_index: int) -> int:
    return int(np.random.SeedSequence([seed, corruption_index, chunk_index]).generate_state(1)[0])


class _FrostCV2:
    """Stands in for ``cv2`` inside ``imagecorruptions.corruptions`` while ``frost`` runs: ``frost`` reads one
    of six large frost photos and resizes it on every call (~6 ms of ~6.5 ms per 32 x 32 image). Both steps
    are pure functions of their arguments, so memoizing them leaves the output bit-identical."""

    def __init__(self, cv2):
        self._cv2 = cv2
        self._read: dict[str, np.ndarray] = {}
        self._resized: dict[tuple, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self._cv2, name)

    def imread(self, path, *args):
        key = str(path)
        if args or key not in self._read:
            img = self._cv2.imread(key, *args)
            if args:
                return img
            img.flags.writeable = False
            self._read[key] = img
        return self._read[key]

    def resize(self, src, dsize, *args, **kwargs):
        cached = any(src is v for v in self._read.values())
        key = (id(src), tuple(dsize), args, tuple(sorted(kwargs.items())))
        if not cached:
            return self._cv2.resize(src, dsize, *args, **kwargs)
        if key not in self._resized:
            out = self._cv2.resize(src, dsize, *args, **kwargs)
            out.flags.writeable = False
            self._resized[key] = out
        return self._resized[key]


_FROST_CV2: _FrostCV2 | None = None


def _corrupt_chunk(task: tuple[str, int, int, int, np.ndarray]) -> np.ndarray:
    """Corrupt a chunk of uint8 images ``[n, C, H, W]`` (C = 1: grey, as FMNIST-C; C = 3: RGB); seeds the global
    RNGs first (see module doc)."""
    name, severity, seed, chunk_index, images = task
    from imagecorruptions import corrupt  # lazy: pulls in cv2, skimage, scipy, numba

    s = _chunk_seed(seed, CORRUPTIONS.index(name), chunk_index)
    np.random.seed(s)
    random.seed(s)
    needs_seed = name in ("glass_blur", "impulse_noise")
    out = np.empty_like(images)
    import imagecorruptions.corruptions as ic

    global _FROST_CV2
    real_cv2 = ic.cv2
    if name == "frost":
        if _FROST_CV2 is None or _FROST_CV2._cv2 is not real_cv2:
            _FROST_CV2 = _FrostCV2(real_cv2)
        ic.cv2 = _FROST_CV2
    try:
        for i, img in enumerate(images):
            grey = img.shape[0] == 1
            rgb = np.repeat(img[0][:, :, None], 3, axis=2) if grey else np.ascontiguousarray(img.transpose(1, 2, 0))
            kwargs = {"seed": int(np.random.randint(2**31 - 1))} if needs_seed else {}
            res = np.asarray(corrupt(rgb, corruption_name=name, severity=severity, **kwargs))
            if grey:
                out[i, 0] = np.clip(res[..., 0] if res.ndim == 3 else res, 0, 255).astype(np.uint8)
            else:
                res = res if res.ndim == 3 else np.repeat(res[:, :, None], 3, axis=2)
                out[i] = np.clip(res, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    finally:
        ic.cv2 = real_cv2
    return out


def _worker_init() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # pragma: no cover - cv2 always comes with imagecorruptions
        pass


def _start_method() -> str:
    """fork when the parent holds no thread pools that a forked child could deadlock on (cv2's, used by an
    earlier in-process build, or torch's OpenMP); else spawn, which needs callers' scripts to guard their
    entry point with ``if __name__ == "__main__":`` (the ``edgeadapt`` command does)."""
    import multiprocessing as mp

    risky = any(m in sys.modules for m in ("cv2", "torch"))
    return "fork" if not risky and "fork" in mp.get_all_start_methods() else "spawn"


def build_fmnist_c(
    out_dir: str | Path,
    severity: int = 5,
    per_corruption: int = 2000,
    corruptions: Sequence[str] = CORRUPTIONS,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Build (or find cached) the FMNIST-C stream; returns the ``.npz`` path.

    The file holds ``x`` uint8 ``[M, 1, 32, 32]``, ``y`` int64 ``[M]``, ``corruption`` int64 ``[M]`` (index into
    ``corruption_names``, a fixed-width unicode array), and scalars ``severity``, ``seed``, ``per_corruption``;
    no pickled objects. ``workers``: processes (default: CPU count, in-process for small builds); the result
    does not depend on it.
    """
    names = validate_corruptions(corruptions)
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer in 1..5, not {severity!r}")
    out = Path(out_dir).expanduser()
    path = out / stream_filename(severity, per_corruption, names, seed)
    write_clean(out)
    if path.exists():
        return path

    x_test, y_test = load_fmnist("test")
    if not 1 <= per_corruption <= len(x_test):
        raise ValueError(f"per_corruption must be in 1..{len(x_test)}, not {per_corruption}")
    tasks = []
    for name in names:
        for ci, start in enumerate(range(0, per_corruption, CHUNK)):
            stop = min(start + CHUNK, per_corruption)
            tasks.append((name, severity, seed, ci, x_test[start:stop]))

    total = len(names) * per_corruption
    if workers is None:
        workers = 1 if total < _MIN_IMAGES_FOR_POOL else min(os.cpu_count() or 1, len(tasks))
    results: list[np.ndarray] = []

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from edgeadapt.progress import progress as make_progress

    bar = make_progress(
        "FMNIST-C", TextColumn("[bold]FMNIST-C[/] s{task.fields[sev]}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[current]}"), fmt="severity {sev} {current}",
        disable=not progress)
    with bar:
        tid = bar.add_task("build", total=total, sev=severity, current="")
        if workers <= 1:
            for task in tasks:
                bar.update(tid, current=task[0])
                results.append(_corrupt_chunk(task))
                bar.advance(tid, len(task[4]))
        else:
            import multiprocessing as mp

            ctx = mp.get_context(_start_method())
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for task, res in zip(tasks, pool.imap(_corrupt_chunk, tasks), strict=True):
                    results.append(res)
                    bar.update(tid, advance=len(res), current=task[0])

    x = np.concatenate(results, axis=0)
    y = np.concatenate([y_test[:per_corruption]] * len(names)).astype(np.int64)
    corruption = np.repeat(np.arange(len(names), dtype=np.int64), per_corruption)
    width = max(len(n) for n in names)
    _atomic_savez(
        path,
        x=x,
        y=y,
        corruption=corruption,
        corruption_names=np.array(names, dtype=f"<U{width}"),
        severity=np.int64(severity),
        seed=np.int64(seed),
        per_corruption=np.int64(per_corruption),
    )
    return path


def load_stream(path: str | Path) -> dict:
    """Load a stream (or clean) ``.npz`` without pickle. ``corruption_names`` comes back as ``list[str]``,
    scalars as python ints."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"stream file {p} not found; build it with `edgeadapt data fmnist-c`")
    with np.load(p, allow_pickle=False) as data:
        out: dict = {}
        for key in data.files:
            arr = data[key]
            if key == "corruption_names":
                out[key] = [str(s) for s in arr]
            elif arr.ndim == 0:
                out[key] = arr.item()
            else:
                out[key] = arr
    return out

