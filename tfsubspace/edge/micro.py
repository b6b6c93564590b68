"""The microcontroller side: TFLite Micro's tensor arena for a file (micro_arena_bytes) and the
C array firmware includes (write_c_array)."""

from __future__ import annotations

import os
from pathlib import Path

from tfsubspace import fileio
from tfsubspace.edge.runtime import _read_tflite
from tfsubspace.errors import TfSubspaceError


def micro_arena_bytes(tflite: bytes | str | os.PathLike) -> int:
    """The tensor arena TFLite Micro allocates for a float32 or int8 model (bytes)."""
    import sys

    from tflite_micro.python.tflite_micro import runtime

    content = tflite if isinstance(tflite, bytes) else _read_tflite(tflite)
    interpreter = runtime.Interpreter.from_bytes(content, arena_size=max(len(content) * 10, 1 << 20))
    import ctypes

    libc = ctypes.CDLL(None)
    read_fd, write_fd = os.pipe()
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    try:
        interpreter.print_allocations()  # written by C++ to file descriptor 2
    finally:
        libc.fflush(None)  # the C library's own buffers
        os.dup2(saved, 2)
        os.close(write_fd)
        os.close(saved)
    text = b""
    while chunk := os.read(read_fd, 65536):
        text += chunk
    os.close(read_fd)
    for line in text.decode(errors="replace").splitlines():
        if "Arena allocation total" in line:
            return int(line.split("total")[1].split()[0])
    raise TfSubspaceError("TFLite Micro did not report its arena allocation.")


def write_c_array(
    tflite: bytes | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str = "g_model",
    arena_bytes: int | None = None,
) -> tuple[Path, Path]:
    """Writes model_data.cc/.h (the xxd -i style array TFLite Micro firmware includes)."""
    content = tflite if isinstance(tflite, bytes) else _read_tflite(tflite)
    out_dir = Path(out_dir)
    arena = (
        f"\n// Tensor arena measured by tfsubspace with TFLite Micro: {arena_bytes} bytes.\n"
        f"constexpr int {name}_arena_size = {arena_bytes};\n"
        if arena_bytes
        else ""
    )
    header = (
        f"#ifndef TFSUBSPACE_MODEL_DATA_H_\n#define TFSUBSPACE_MODEL_DATA_H_\n\n"
        f"extern const unsigned char {name}[];\nextern const unsigned int {name}_len;\n{arena}\n"
        f"#endif  // TFSUBSPACE_MODEL_DATA_H_\n"
    )
    rows = [", ".join(f"0x{b:02x}" for b in content[i : i + 12]) for i in range(0, len(content), 12)]
    source = (
        f'#include "model_data.h"\n\nalignas(16) const unsigned char {name}[] = {{\n  '
        + ",\n  ".join(rows)
        + f"\n}};\nconst unsigned int {name}_len = {len(content)};\n"
    )
    return (fileio.write_text(out_dir / "model_data.h", header), fileio.write_text(out_dir / "model_data.cc", source))
