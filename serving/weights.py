"""The served weights (safetensors) mapped into memory, not read: `safetensors.numpy`'s
`load_file` copies the whole file while holding the GIL (~280 ms for a 1M-user version,
during which the worker answered nothing), and each worker kept its own copy. A mapping
costs nothing to open, shares the page cache between workers, and the version's checksum
check has just read the file into that cache.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header of name -> {dtype, shape, data_offsets}, then the raw tensors."""

import json
import struct
from pathlib import Path

import numpy as np

from recsys.core.errors import ArtifactError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def mapped_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only array over one mapping."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        mapping = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError, struct.error) as exc:
        raise ArtifactError(f"{path}: not a safetensors file ({exc})") from exc
    start = 8 + length
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(spec["dtype"])
        if dtype is None:
            raise ArtifactError(f"{path}: tensor {name} has unsupported dtype {spec['dtype']}")
        begin, end = spec["data_offsets"]
        raw = mapping[start + begin : start + end]
        tensors[name] = raw.view(dtype).reshape(spec["shape"])
    return tensors
