"""Pieces every benchmark here shares: the MLP they serve, percentiles, CPU accounting and number formatting."""

import os
from pathlib import Path

import numpy as np


def build_mlp(directory: Path) -> None:
    """64 -> 256 -> 256 -> 10 dense layers with ReLU between them."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    dims = (64, 256, 256, 10)

    class MLP(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            pairs = list(zip(dims, dims[1:], strict=False))
            self.w = [tf.Variable(rng.normal(0, (2 / a) ** 0.5, (a, b)).astype("float32")) for a, b in pairs]
            self.b = [tf.Variable(np.zeros(b, "float32")) for b in dims[1:]]

        @tf.function(input_signature=[tf.TensorSpec([None, dims[0]], tf.float32, name="x")])
        def serve(self, x):
            for i, (w, b) in enumerate(zip(self.w, self.b, strict=True)):
                x = tf.matmul(x, w) + b
                x = tf.nn.relu(x) if i < len(self.w) - 1 else x
            return {"y": x}

    module = MLP()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all threads (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have used (Linux /proc/stat: everything but idle and iowait)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or value != value:
        return "-"
    return f"{value:{spec}}{suffix}"
