#!/usr/bin/env python3
"""Cuts the embedded Fashion-MNIST subset (data/fashion-mnist-subset/) from the full set.

The full set comes from Debian's `dataset-fashion-mnist` package
(/usr/share/datasets/fashion-mnist). The subset keeps the first TRAIN training images and the
first TEST test images, in their original order, as IDX files compressed with gzip
(deterministically: no file name, mtime 0).

    python3 scripts/make-data-subset.py [SRC_DIR] [DST_DIR]
"""
import gzip
import struct
import sys

TRAIN, TEST = 4000, 1000
src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
dst = sys.argv[2] if len(sys.argv) > 2 else "data/fashion-mnist-subset"


def cut(name, keep):
    with gzip.open(f"{src}/{name}", "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    item = 1
    for d in dims[1:]:
        item *= d
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * ndim, keep, *dims[1:])
    body = data[4 + 4 * ndim:4 + 4 * ndim + keep * item]
    assert len(body) == keep * item, name
    with open(f"{dst}/{name}", "wb") as out:
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as g:
            g.write(header + body)


for name, keep in [("train-images-idx3-ubyte.gz", TRAIN), ("train-labels-idx1-ubyte.gz", TRAIN),
                   ("t10k-images-idx3-ubyte.gz", TEST), ("t10k-labels-idx1-ubyte.gz", TEST)]:
    cut(name, keep)
print(f"wrote {TRAIN} training and {TEST} test images to {dst}")
