"""Run outputs: ``metrics.jsonl`` (one row per round), ``summary.json`` and ``rounds.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from converters.errors import ConfigError


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunReport:
    """Appends round rows and writes the summary and plot into ``out_dir``."""

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission
            raise ConfigError(
                f"out_dir must be a directory it can create or write, got {str(out_dir)!r} "
                f"({exc.strerror})"
            ) from None
        self.metrics_path = self.dir / "metrics.jsonl"
        self.rows: list[dict] = []

    def start_fresh(self) -> None:
        """A new run: forget rows and outputs an earlier run left in this folder."""
        self.rows = []
        for name in ("metrics.jsonl", "summary.json", "rounds.png"):
            (self.dir / name).unlink(missing_ok=True)

    def load_existing(self, *, upto_round: int) -> None:
        """On resume: keep rows of completed rounds only (a crash may have left a later one)."""
        rows = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("round", 0) <= upto_round:
                        rows.append(row)
        self.rows = rows
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def add(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def summary(self, extra: dict) -> dict:
        done = [r for r in self.rows if r.get("status") == "ok"]
        last = done[-1] if done else {}
        summary = {
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "rounds": len(self.rows),
            "rounds_ok": len(done),
            "epsilon": last.get("epsilon"),
            "bytes_up": sum(r.get("bytes_up", 0) for r in self.rows),
            "bytes_down": sum(r.get("bytes_down", 0) for r in self.rows),
            "seconds": sum(r.get("seconds", 0.0) for r in self.rows),
            "rejected": sum(r.get("rejected", 0) for r in self.rows),
            "late": sum(r.get("late", 0) for r in self.rows),
            **extra,
        }
        summary = {k: _clean(v) for k, v in summary.items()}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def plot(self) -> Path | None:
        """Accuracy and bytes per round; skipped (None) if matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rounds = [r["round"] for r in self.rows]
        acc = [r.get("accuracy") if r.get("accuracy") is not None else math.nan for r in self.rows]
        up = [r.get("bytes_up", 0) / 2**20 for r in self.rows]
        down = [r.get("bytes_down", 0) / 2**20 for r in self.rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(rounds, acc, marker="o")
        ax1.set(xlabel="round", ylabel="test accuracy", title="Accuracy per round", ylim=(0, 1))
        ax1.grid(alpha=0.3)
        ax2.bar([r - 0.2 for r in rounds], up, width=0.4, label="up (devices -> cloud)")
        ax2.bar([r + 0.2 for r in rounds], down, width=0.4, label="down (cloud -> devices)")
        ax2.set(xlabel="round", ylabel="MiB on the wire", title="Bytes per round")
        ax2.legend()
        fig.tight_layout()
        path = self.dir / "rounds.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
