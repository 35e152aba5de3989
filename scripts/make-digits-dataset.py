"""Converts scikit-learn's bundled digits.csv.gz into data/digits/digits.npz and data/digits/digits.csv.

Usage: python scripts/make-digits-dataset.py PATH/TO/digits.csv.gz [--out data/digits]

The input is the file scikit-learn ships as sklearn/datasets/data/digits.csv.gz: 1797 rows, 64 pixel counts
(0..16) followed by the label (0..9), no header. Pixels are scaled to 0..1 (k/16, exact in float32 and in the
4-decimal text of the CSV), so the NPZ and the CSV hold the same examples, in the file's order.
"""

import argparse
import gzip
from pathlib import Path

import numpy as np

NUM_PIXELS = 64


def read_digits(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns (x float32 [N, 64] in 0..1, y int64 [N]) from scikit-learn's digits.csv.gz."""
    with gzip.open(source, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != NUM_PIXELS + 1:
        raise ValueError(f"{source}: expected {NUM_PIXELS + 1} columns, got shape {table.shape}")
    pixels, labels = table[:, :NUM_PIXELS], table[:, NUM_PIXELS]
    if pixels.min() < 0 or pixels.max() > 16 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{source}: values out of range (pixels 0..16, labels 0..9)")
    return (pixels / 16.0).astype(np.float32), labels.astype(np.int64)


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Header p0..p63,label; pixel values in their shortest exact decimal form (0, 0.0625, ..., 1)."""
    header = ",".join([f"p{i}" for i in range(x.shape[1])] + ["label"])
    with path.open("w", newline="\n") as f:
        f.write(header + "\n")
        for row, label in zip(x, y, strict=True):
            f.write(",".join(f"{float(v):g}" for v in row) + f",{int(label)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="path of scikit-learn's digits.csv.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "digits")
    args = parser.parse_args()
    x, y = read_digits(args.source)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "digits.npz", x=x, y=y)
    write_csv(args.out / "digits.csv", x, y)
    print(f"wrote {len(y)} examples to {args.out}/digits.npz and digits.csv")


if __name__ == "__main__":
    main()
