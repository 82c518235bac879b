"""Reads and writes safetensors files with numpy alone (the format: an 8-byte
little-endian header length, a JSON header of {name: {dtype, shape,
data_offsets}}, then the raw buffers).

As a script, rewrites a file with every float tensor in another type (f16 for
the trip to a GPU machine, f32 to undo it there):

    python safetensors_np.py IN OUT f16|f32
"""
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read(path):
    """{name: numpy array}, in file order."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write(path, tensors):
    names = {v: k for k, v in DTYPES.items()}
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": names[a.dtype.type], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def main():
    src, dst, to = sys.argv[1], sys.argv[2], DTYPES[sys.argv[3].upper()]
    floats = (np.float32, np.float16)
    write(dst, {k: a.astype(to) if a.dtype.type in floats else a for k, a in read(src).items()})


if __name__ == "__main__":
    main()
