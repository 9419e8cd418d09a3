"""A benchmark stream from your own images: an image-folder tree (one subfolder per class) -> a stream ``.npz`` in
the format ``bench accuracy|runtime|update --data`` reads (the FMNIST-C stream's: ``x`` uint8 [N, C, H, W], ``y``,
``corruption`` and ``corruption_names``).

Labels are the subfolder names, sorted (class index = position), and are written one per line beside the stream
(``F.labels.txt``: what ``edgeadapt export --labels-file`` takes), so a bundle and its stream agree on the classes.
Images are shuffled once (seeded): a stream in folder order would be sorted by class, a setting of its own
(``bench accuracy --stream class-sorted`` builds that from any stream). With ``corruptions`` every domain is the
whole image set under one corruption of the benchmark's (imagecorruptions-imaug, as FMNIST-C) at its severity,
the domains concatenated in the order given (a continual stream); without, one domain ``clean``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: file types read (Pillow decodes each; anything else in the tree is skipped and counted)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def parse_corruptions(text: str | None) -> list[tuple[str, int]]:
    """``"gaussian_noise:3,fog:5"`` -> [(name, severity), ...] (severity 1..5, default 5)."""
    from edgeadapt.datasets.fmnist import validate_corruptions

    if not text:
        return []
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, sev = part.partition(":")
        try:
            severity = int(sev) if sev else 5
        except ValueError:
            raise ValueError(f"corruption {part!r}: severity must be a whole number 1..5") from None
        if not 1 <= severity <= 5:
            raise ValueError(f"corruption {part!r}: severity must be 1..5")
        out.append((name.strip(), severity))
    validate_corruptions(sorted({n for n, _ in out}))  # the same corruption may come at several severities
    if len(set(out)) != len(out):
        raise ValueError(f"corruption list has duplicates: {text}")
    return out


def scan_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str], int]:
    """-> (image files, their labels, class names sorted, files skipped). Classes are the subfolders of ``root``
    that hold at least one image (searched recursively)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory (expected one subfolder of images per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels, skipped, names = [], [], 0, []
    for name in classes:
        found = []
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(f)
                else:
                    skipped += 1
        if found:
            labels += [len(names)] * len(found)
            names.append(name)
            files += found
    if not files:
        raise ValueError(f"{root} has no class subfolders with images ({', '.join(IMAGE_SUFFIXES)})")
    if len(names) < 2:
        raise ValueError(f"{root} has one class ({names[0]!r}): a classifier's stream needs at least two subfolders")
    return files, np.asarray(labels, np.int64), names, skipped


def load_images(files: list[Path], size: tuple[int, int] | None, mode: str | None) -> tuple[np.ndarray, str]:
    """Decode, convert to ``mode`` (L or RGB; None: L when every image is grey, else RGB) and resize straight to
    ``size`` (H, W; None: the first image's size). -> (uint8 [N, C, H, W], mode)."""
    from PIL import Image, ImageOps

    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
                images.append(im.copy())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{f}: not a readable image ({exc})") from None
    if mode is None:
        mode = "L" if all(im.mode in ("1", "L", "LA", "I", "I;16") for im in images) else "RGB"
    h, w = size if size is not None else (images[0].height, images[0].width)
    out = np.empty((len(images), 1 if mode == "L" else 3, h, w), np.uint8)
    for i, im in enumerate(images):
        if im.mode.startswith("I"):  # 16-bit grey: the top 8 bits
            im = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8), "L")
        im = im.convert(mode)
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        a = np.asarray(im, np.uint8)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out, mode


def labels_path(out: str | Path) -> Path:
    """Where the class names of stream ``out`` are written: ``F.npz`` -> ``F.labels.txt``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".npz") + ".labels.txt")


def build_folder_stream(root: str | Path, out: str | Path, size: tuple[int, int] | None = None,
                        mode: str | None = None, corruptions: list[tuple[str, int]] | None = None,
                        seed: int = 0) -> dict:
    """Build the stream (see the module docstring). -> a summary (path, labels file, n, shape, classes, domains)."""
    from edgeadapt.datasets.fmnist import CHUNK, _atomic_savez, _corrupt_chunk

    if mode not in (None, "L", "RGB"):
        raise ValueError(f"mode must be L or RGB, not {mode!r}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be H,W of positive integers, not {size}")
    files, y, names, skipped = scan_folder(root)
    x, mode = load_images(files, size, mode)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    domains = corruptions or []
    if domains:
        if min(x.shape[2:]) < 32:
            raise ValueError(f"the benchmark's corruptions need images of at least 32x32, these are "
                             f"{x.shape[2]}x{x.shape[3]} (give --size)")
        parts = []
        for ci, (name, sev) in enumerate(domains):
            try:
                parts += [_corrupt_chunk((name, sev, seed + ci, k, x[s : s + CHUNK]))
                          for k, s in enumerate(range(0, len(x), CHUNK))]
            except Exception as exc:  # imagecorruptions' own limits (sizes, shapes): say which corruption
                raise ValueError(f"corruption {name}:{sev} failed on {list(x.shape[1:])} images: {exc}") from exc
        xs = np.concatenate(parts)
        domain_names = [f"{n}-s{s}" for n, s in domains]
    else:
        xs, domain_names = x, ["clean"]
    n_dom = len(domain_names)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savez(out, x=xs, y=np.tile(y, n_dom), corruption=np.repeat(np.arange(n_dom), len(x)).astype(np.int64),
                  corruption_names=np.array(domain_names))
    lp = labels_path(out)
    lp.write_text("".join(f"{n}\n" for n in names))
    return {"path": str(out), "labels_file": str(lp), "n": int(len(xs)), "images": int(len(x)),
            "shape": list(xs.shape[1:]), "mode": mode, "classes": names, "domains": domain_names,
            "skipped_files": skipped}
