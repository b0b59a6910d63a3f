"""What a run prints: one line per epoch for batch logs, a live bar only on a terminal."""
from __future__ import annotations

import math
import sys


class Progress:
    """One line per epoch for batch logs; a live bar only when stdout is a terminal."""

    def __init__(self, mode: str, enabled: bool):
        self.enabled = enabled and mode != "off"
        self.bar = self.enabled and mode == "auto" and sys.stdout.isatty()

    def log(self, text: str):
        """Print a line (clearing the live bar first) unless progress output is off."""
        if self.enabled:
            if self.bar:
                sys.stdout.write("\r\x1b[K")
            print(text, flush=True)

    def step(self, epoch, total_epochs_, step, steps, loss):
        """Redraw the live bar with the step count and loss (a value, or a callable that reads it: only
        called here, so a batch log costs no device sync per step); does nothing when there is no bar."""
        if self.bar:
            loss = loss() if callable(loss) else loss
            width = 30
            fill = int(width * step / steps)
            sys.stdout.write(f"\r  epoch {epoch + 1}/{total_epochs_} [{'#' * fill}{'.' * (width - fill)}] "
                             f"{step}/{steps} loss {loss:.4f}")
            sys.stdout.flush()


def _num(v, fmt=".3g") -> str:
    """A figure as text; NaN and infinities print as such, never as a number they are not."""
    return format(v, fmt) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


def _per(values, skip_first=False, skip_last=False) -> str:
    """Per-boundary or per-stage values, comma separated; slots that do not apply are dropped
    (rank 0 has no incoming boundary), but a NaN where a value belongs prints as nan."""
    vals = list(values)[1 if skip_first else 0:len(values) - (1 if skip_last else 0)]
    return ",".join(_num(v, ".2f") for v in vals)


def epoch_line(row: dict, n_epochs: int) -> str:
    """The one-line report of an epoch: phase, lr, train and test figures, per-boundary diagnostics of
    parallel epochs, and the time split."""
    acc = "" if math.isnan(row["test_acc"]) else \
        f" test_loss {_num(row['test_loss'], '.4f')} test_acc {100 * row['test_acc']:6.2f}%"
    par = ""
    if row["phase"] != "serial":
        res = list(row["residual"])[1:]
        par = (f" beta {_num(row['beta'])} residual {_per(res)}"
               f" consistency {_per(row['consistency'], skip_first=True)}"
               f" cos {_per(row['grad_cosine'])}"
               f" gnorm {_per(row['grad_norm_ratio'])}"
               f" wait {max(row['wait_seconds']):.2f}s")
    sw = f" switch {row['switch_seconds']:.2f}s" if row["switch_seconds"] > 0.005 else ""
    return (f"epoch {row['epoch'] + 1:4d}/{n_epochs} {row['phase']:7s} lr {row['lr']:.4f} "
            f"train_loss {_num(row['train_loss'], '.4f')} train_acc {_num(100 * row['train_acc'], '6.2f')}%"
            f"{acc}{par} time {row['epoch_seconds']:.2f}s (compute {max(row['compute_seconds']):.2f}s, "
            f"comm {max(row['comm_seconds']):.2f}s){sw}")
