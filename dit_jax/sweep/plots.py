"""The scaling figure of a sweep: quality against training compute and against Gflops.

As the DiT paper's figures: one line per model size (depth and width, and any swept value that
is not the model's), its points the patch sizes (each labelled `/p`), log-scaled x. A row per
quality metric that the finished points have (FID, the digits Fréchet distance, the digits
accuracy), and a last row for the final training loss. Only finished points are drawn.
matplotlib with the Agg backend (no display).
"""
import io
from typing import Any, Optional, Sequence

from dit_jax import fs
from dit_jax.sweep.results import LABELS, QUALITY

PLOT_FILE = "scaling.png"
X_AXES = (("train_gflops", "training compute (Gflops)"), ("gflops", "model Gflops (per image)"))


def size_label(row: dict[str, Any], swept: Sequence[str]) -> str:
  """The line a point belongs to: its model size and its swept values outside `model.`."""
  others = [f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in swept if not k.startswith("model.")]
  return ", ".join([f"depth {row['depth']}, width {row['hidden_size']}", *others])


def figure_png(rows: Sequence[dict[str, Any]], swept: Sequence[str],
               title: str = "") -> Optional[bytes]:
  """The figure as PNG bytes; None when no point has finished with a quality metric."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  done = [r for r in rows if r["status"] == "finished"]
  metrics = [m for m in QUALITY if any(r.get(m) is not None for r in done)]
  if not metrics:
    return None
  if any(r.get("final_loss") is not None for r in done):
    metrics.append("final_loss")
  lines: dict[str, list[dict[str, Any]]] = {}
  for row in sorted(done, key=lambda r: (r["params"], r["gflops"])):
    lines.setdefault(size_label(row, swept), []).append(row)
  fig, axes = plt.subplots(len(metrics), len(X_AXES), figsize=(10, 3.8 * len(metrics)),
                           squeeze=False)
  for i, metric in enumerate(metrics):
    for j, (x_key, x_label) in enumerate(X_AXES):
      ax = axes[i][j]
      for label, points in lines.items():
        points = sorted((p for p in points if p.get(metric) is not None), key=lambda p: p[x_key])
        xs, ys = [p[x_key] for p in points], [p[metric] for p in points]
        ax.plot(xs, ys, marker="o", label=label)
        for p, x, y in zip(points, xs, ys):
          ax.annotate(f"/{p['patch_size']}", (x, y), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
      ax.set_xscale("log")
      ax.set_xlabel(x_label)
      better = "lower" if QUALITY.get(metric, True) else "higher"
      ax.set_ylabel(f"{LABELS[metric]}\n({better} is better)")
      ax.grid(True, which="both", alpha=0.3)
      if i == 0 and j == 0:
        ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=90)
  plt.close(fig)
  return buffer.getvalue()


def write(workdir: str, rows: Sequence[dict[str, Any]], swept: Sequence[str],
          title: str = "") -> Optional[str]:
  """WORKDIR/scaling.png (replaced whole); its path, or None when there is nothing to draw."""
  png = figure_png(rows, swept, title)
  if png is None:
    return None
  path = fs.join(workdir, PLOT_FILE)
  fs.write_bytes(path, png)
  return path
