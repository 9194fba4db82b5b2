"""What one training sample costs to read: tar parsing, then decoding (ours vs plain np.load).

    python -m benchmarks.shard_decode --shard DATASET_DIR/000000.tar [--rounds 5]

Reads the shard's raw members once (timing WebDataset's tar parsing), then decodes every sample
with emf_dist.train.shard_loader.decode_sample as it is (npy headers parsed once per layout) and with
``np.load(allow_pickle=False)`` for every member (what it did before), alternating rounds in one
process so the machine's drift hits both alike. Prints milliseconds per sample.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
from unittest import mock

import numpy as np

from emf_dist.train import shard_loader


def read_raw(path: str) -> list[dict]:
    with open(path, "rb") as stream:
        return list(shard_loader.raw_samples(path, stream))


def decode_all(raw: list[dict], image_kind: str) -> float:
    start = time.perf_counter()
    for sample in raw:
        shard_loader.decode_sample(sample, image_kind)
    return (time.perf_counter() - start) / len(raw) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard", required=True)
    parser.add_argument("--image-kind", default="png")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    tar_ms, ours_ms, np_load_ms = [], [], []
    np_load = lambda data: np.load(io.BytesIO(data), allow_pickle=False)  # noqa: E731
    for _ in range(args.rounds):
        start = time.perf_counter()
        raw = read_raw(args.shard)
        tar_ms.append((time.perf_counter() - start) / len(raw) * 1e3)
        ours_ms.append(decode_all(raw, args.image_kind))
        with mock.patch.object(shard_loader, "_load_npy", np_load):
            np_load_ms.append(decode_all(raw, args.image_kind))
    median = statistics.median
    print(f"{len(raw)} samples, median of {args.rounds} rounds, ms per sample:")
    print(f"  tar parsing (webdataset)     {median(tar_ms):.3f}")
    print(f"  decode, npy header cached    {median(ours_ms):.3f}")
    print(f"  decode, np.load per member   {median(np_load_ms):.3f}")
    print(f"  read + decode: {median(tar_ms) + median(ours_ms):.3f} vs {median(tar_ms) + median(np_load_ms):.3f} "
          f"({(median(tar_ms) + median(np_load_ms)) / (median(tar_ms) + median(ours_ms)):.2f}x)")


if __name__ == "__main__":
    main()
