"""Writes data/regression/regression.npz: a small synthetic regression data set, the same bytes on every run.

    .venv/bin/python data/regression/make_dataset.py [OUTPUT]

1000 examples of 8 features drawn from a seeded generator; two targets computed from them (a smooth non-linear
function plus a little noise), so that a small MLP learns them in a few epochs on a laptop:

  y  [N]     float32: 2*x0 - x1 + 0.5*x2*x3 + sin(pi*x4) + 0.1*noise
  y2 [N, 2]  float32: column 0 is y; column 1 is x5**2 - 0.5*x6 + 0.3*x7 + 0.1*noise

The features are standard normal except x4 (uniform in [-1, 1]). Nothing here comes from outside the project.
"""

import sys
from pathlib import Path

import numpy as np

SEED = 20261130
EXAMPLES = 1000
FEATURES = 8


def make(examples: int = EXAMPLES, seed: int = SEED) -> dict[str, np.ndarray]:
    """The arrays of the data set: x [N, 8], y [N] and y2 [N, 2], all float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((examples, FEATURES))
    x[:, 4] = rng.uniform(-1.0, 1.0, examples)
    noise = rng.standard_normal((examples, 2))
    first = 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + np.sin(np.pi * x[:, 4]) + 0.1 * noise[:, 0]
    second = x[:, 5] ** 2 - 0.5 * x[:, 6] + 0.3 * x[:, 7] + 0.1 * noise[:, 1]
    return {
        "x": x.astype(np.float32),
        "y": first.astype(np.float32),
        "y2": np.stack([first, second], axis=1).astype(np.float32),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("regression.npz")
    np.savez(out, **make())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
