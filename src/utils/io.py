"""Atomic writes and logging: a crash never leaves a half-written output under its final name."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only swap it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it onto `final_path` only on success.

    The temporary name keeps the suffix so libraries that dispatch on it (cv2, h5py, np.save) work.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.stem}.", suffix=f".tmp{final_path.suffix}",
                                    dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; an output gets open()'s mode
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_npy_atomic(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())


def setup_logging(verbose: bool = False) -> logging.Logger:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return logging.getLogger("hpa")


class UserInputError(Exception):
    """Bad input from the user (paths, tables, flags): printed as one line by `run_cli`."""


@contextlib.contextmanager
def readable_h5(path: Path) -> Iterator[None]:
    """Turn the errors of a damaged HDF5 (truncated, empty, not HDF5, bit-flipped data or metadata)
    into one UserInputError line naming the file."""
    try:
        yield
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as error:
        if isinstance(error, (UserInputError, FileNotFoundError)):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(f"{path} cannot be read as the expected HDF5 file ({reason}); it is damaged or "
                             "truncated: rerun the stage that wrote it") from None


def run_cli(main, argv=None) -> None:
    """Run a CLI `main(argv) -> int`, turning expected input errors into one clear line and exit 2."""
    from src.data.bbox_records import RecordError
    from src.data.images import ImageReadError
    from src.data.labels import LabelTableError

    try:
        code = main(argv)
    except (UserInputError, ImageReadError, LabelTableError, RecordError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError, PermissionError) as error:  # the last four: a path the user gave is wrong
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
