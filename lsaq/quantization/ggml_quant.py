"""llama.cpp's own quantizer, called on float rows: the GGUF types of a build, never a hand-written K-quant.

``ggml_quantize_chunk`` of the ``libggml-base`` library that llama-cpp-python ships (the ``llama`` extra) turns
float32 rows into any ggml type: F32, F16, BF16 (conversions), Q8_0, Q4_0, Q4_1 (round to nearest per block of 32)
and the K-quants (Q4_K etc.: per-block scales and minimums searched to reduce the squared error). It is the same
code ``llama-quantize`` runs, so a tensor here is byte for byte what llama.cpp would write for these values.
Rows are split across threads (the foreign call releases the GIL).
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lsaq.planning.ggml import GgmlType, row_bytes

INSTALL_HINT = "GGUF builds need llama.cpp's Python binding: pip install 'lsaq[llama]' (llama-cpp-python)"


class LlamaCppMissing(RuntimeError):
    """llama-cpp-python is not installed (or its libraries are not where it keeps them)."""


@functools.lru_cache(maxsize=1)
def _quantize_chunk() -> ctypes._CFuncPtr:
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppMissing(INSTALL_HINT) from None
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        raise LlamaCppMissing(f"{INSTALL_HINT}; found no libggml-base beside {llama_cpp.__file__}")
    fn = ctypes.CDLL(str(libs[0])).ggml_quantize_chunk
    # size_t ggml_quantize_chunk(type, const float * src, void * dst, int64 start, int64 nrows, int64 n_per_row,
    #                            const float * imatrix)
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    return fn


def check_llama_cpp() -> None:
    """``LlamaCppMissing`` with the install line when llama.cpp's quantizer cannot be loaded."""
    _quantize_chunk()


def quantize_rows(values: np.ndarray, ggml_type: GgmlType, *, threads: int | None = None) -> np.ndarray:
    """float ``values [rows, n]`` (or ``[n]``) in ``ggml_type``: uint8 ``[rows, row_bytes]`` (``[row_bytes]``).

    ``ValueError`` when the type's block does not divide ``n``."""
    src = np.ascontiguousarray(values, dtype=np.float32)
    vector = src.ndim == 1
    rows2d = src.reshape(1, -1) if vector else src.reshape(-1, src.shape[-1])
    nrows, n = rows2d.shape
    per_row = row_bytes(ggml_type, n)
    dst = np.empty((nrows, per_row), dtype=np.uint8)
    fn = _quantize_chunk()
    workers = max(1, min(threads or os.cpu_count() or 1, nrows))
    step = -(-nrows // workers)

    def run(first: int) -> int:
        count = min(step, nrows - first)
        return int(fn(int(ggml_type), rows2d.ctypes.data, dst.ctypes.data, first * n, count, n, None))

    if workers == 1:
        written = run(0)
    else:
        with ThreadPoolExecutor(workers) as pool:
            written = sum(pool.map(run, range(0, nrows, step)))
    if written != dst.nbytes:
        raise RuntimeError(f"llama.cpp wrote {written} bytes of {ggml_type.name} for {nrows} x {n}, "
                           f"expected {dst.nbytes}")
    return dst.reshape(per_row) if vector else dst.reshape(*src.shape[:-1], per_row)


def dequantize_rows(data: np.ndarray, ggml_type: GgmlType, n: int) -> np.ndarray:
    """Inverse of :func:`quantize_rows` (the ``gguf`` package's dequantizer): float32 ``[rows, n]``."""
    from gguf import GGMLQuantizationType, dequantize

    rows = np.ascontiguousarray(data).reshape(-1, row_bytes(ggml_type, n))
    return dequantize(rows, GGMLQuantizationType(int(ggml_type))).reshape(-1, n)


__all__ = ["INSTALL_HINT", "LlamaCppMissing", "check_llama_cpp", "dequantize_rows", "quantize_rows"]
