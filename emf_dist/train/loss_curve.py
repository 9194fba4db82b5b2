"""A training run's metric history as files people can open: ``metrics.jsonl`` and ``loss.png``.

The history lives in the run's folder beside ``samples/`` and is rewritten whole (storage writes are
atomic; an object store cannot append). A resumed run keeps the rows up to the step it resumed
from and drops the later ones, which belonged to steps it is about to train again.
"""
from __future__ import annotations

import io
import json

from emf_dist import storage

HISTORY, PLOT = "metrics.jsonl", "loss.png"


class LossCurve:
    def __init__(self, run_url: str, resumed_at: int):
        self.store = storage.Store(run_url)
        self.rows = [row for row in read_history(self.store) if row["step"] <= resumed_at]

    def add(self, metrics: dict) -> None:
        self.rows.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def write(self) -> None:
        if not self.rows:
            return
        self.store.write_bytes("".join(json.dumps(row) + "\n" for row in self.rows).encode(), HISTORY)
        self.store.write_bytes(plot_png(self.rows), PLOT)


def read_history(store: storage.Store) -> list[dict]:
    data = store.read_bytes(HISTORY)
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()] if data else []


def plot_png(rows: list[dict]) -> bytes:
    """Loss (log scale) and gradient norm against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    figure, (loss_axis, grad_axis) = plt.subplots(1, 2, figsize=(9, 3.2))
    losses = [row["loss"] for row in rows]
    loss_axis.set(xlabel="step", ylabel="loss (mean since the previous point)",
                  yscale="log" if min(losses) > 0 else "linear")
    loss_axis.plot(steps, losses, marker=".")
    grad_axis.plot(steps, [row["grad_norm"] for row in rows], marker=".", color="tab:orange")
    grad_axis.set(xlabel="step", ylabel="gradient norm")
    for axis in (loss_axis, grad_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
