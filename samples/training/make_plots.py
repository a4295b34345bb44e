"""Loss against step and against wall-clock of the training runs (samples/training/losses.png).

    python samples/training/make_plots.py WORKDIR     # WORKDIR of run_experiment.sh: reads */train_log.jsonl

Writes train_logs.json (every step's loss, time and density, small) and losses.png next to this file, and prints
the sparse run's loss over the dense run's, step by step. A training loss is measured at one random noise level per
step, so it is noisy: the curves are running means over 20 steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).parent
RUNS = {
    "61 frames (length extension)": ("dense61", "radial61"),
    "31 frames (sparse fine-tuning)": ("dense31", "moba31"),
}
WINDOW = 20


def running_mean(values: list[float], window: int = WINDOW) -> np.ndarray:
    """Mean of the last ``window`` values at each step (of all of them before step ``window``)."""
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (sums[end] - sums[start]) / (end - start)


def main(work: Path) -> None:
    """Read the four runs' logs under ``work``, write train_logs.json and losses.png here."""
    logs = {}
    for pair in RUNS.values():
        for run in pair:
            records = [json.loads(line) for line in (work / run / "train_log.jsonl").read_text().splitlines()]
            logs[run] = {key: [r[key] for r in records] for key in ("step", "loss", "elapsed_s", "density")}
    (HERE / "train_logs.json").write_text(json.dumps(logs))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for row, (title, pair) in enumerate(RUNS.items()):
        for run in pair:
            smooth = running_mean(logs[run]["loss"])
            axes[row, 0].plot(logs[run]["step"], smooth, label=run)
            axes[row, 1].plot(np.asarray(logs[run]["elapsed_s"]) / 60, smooth, label=run)
        axes[row, 0].set(title=f"{title}: loss vs step", xlabel="step", ylabel=f"loss (mean of {WINDOW})")
        axes[row, 1].set(title=f"{title}: loss vs wall-clock", xlabel="minutes (contended, 1 thread)")
        for ax in axes[row]:
            ax.legend()
    for title, (dense, sparse) in RUNS.items():
        # The same clip and noise level at each step in both runs: the ratio is the sparse forward's error.
        ratio = np.asarray(logs[sparse]["loss"]) / np.asarray(logs[dense]["loss"])
        q10, q90 = np.quantile(ratio, [0.1, 0.9])
        print(
            f"{title}: loss {sparse} / {dense} step by step: median {np.median(ratio):.2f}, 80 % of steps in "
            f"{q10:.2f}-{q90:.2f}, step 1 {ratio[0]:.2f}, first {WINDOW} steps {np.median(ratio[:WINDOW]):.2f}, "
            f"last {WINDOW} {np.median(ratio[-WINDOW:]):.2f}"
        )
    fig.tight_layout()
    fig.savefig(HERE / "losses.png", dpi=80)
    print(f"wrote {HERE / 'losses.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
