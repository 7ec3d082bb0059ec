"""Run logging on global rank 0: a console line per step, progress bars, a JSONL metrics file,
TensorBoard, W&B (if installed and asked for), sample responses, and at the end a PNG of the
reward and validation-accuracy curves next to the metrics file. One step axis for everything
(the rollout step). Other ranks get a no-op monitor (``Monitor(enabled=False)``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

__all__ = ["Monitor", "plot_curves", "run_summary"]

CONSOLE_KEYS = (("reward_mean", "reward", ".3f"), ("acc_rate", "acc", ".3f"),
                ("loss", "loss", ".4f"), ("pg_loss", "pg", ".4f"), ("kl_loss", "kl", ".4f"),
                ("cpl_loss", "cpl", ".4f"), ("grad_norm", "gnorm", ".3f"),
                ("rollout_vs_train_logprob_diff", "lp_diff", ".4f"),
                ("time/step", "s/step", ".1f"), ("tokens_per_s", "tok/s", ".0f"))


class Monitor:
    def __init__(self, *, log_dir: Optional[str], enabled: bool = True,
                 tensorboard_dir: Optional[str] = None, wandb_project: Optional[str] = None,
                 wandb_name: Optional[str] = None, config: Optional[dict] = None,
                 progress: bool = True, total_steps: Optional[int] = None):
        self.enabled = enabled
        # bars only on a terminal: in a redirected log (a cluster job's) every refresh of a bar
        # would be a fragment of text
        self.show_progress = progress and enabled and sys.stderr.isatty()
        self.total_steps = total_steps
        self._tb = self._wandb = None
        self._jsonl = None
        self.history: list[dict] = []
        self.log_dir = Path(log_dir) if log_dir else None
        if not enabled:
            return
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=config)

    # ---- output

    def print(self, *args) -> None:
        if self.enabled:
            print(*args, flush=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def progress(self, items: Sequence, desc: str) -> Iterable:
        if not self.show_progress:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.history.append(record)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                if self._tb is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {step}{total}"]
        for key, short, fmt in CONSOLE_KEYS:
            if key in metrics:
                parts.append(f"{short} {format(metrics[key], fmt)}")
        if metrics.get("skipped_steps"):
            parts.append(f"SKIPPED {int(metrics['skipped_steps'])}")
        print(" | ".join(parts), flush=True)

    def dump_generations(self, directory: str, step: int, prompts: Sequence[Any],
                         samples: Sequence[Any]) -> None:
        """Every response of a step to ``directory/<step>.jsonl`` (the reference's rollout and
        validation dumps): its prompt's text and row index, the response, the ground truth, the
        reward and its parts, the advantage (training) and the finish reason."""
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{step}.jsonl"), "w") as fh:
            for s in samples:
                prompt = prompts[s.group_id]
                row = {"step": step, "index": s.index, "data_source": prompt.data_source,
                       "input": prompt.prompt, "output": s.response_text,
                       "ground_truth": s.ground_truth, "score": s.reward,
                       "advantage": s.advantage, "finish_reason": s.finish_reason,
                       "response_length": int(s.response_ids.numel()),
                       **{k: v for k, v in s.reward_extra.items()
                          if isinstance(v, (int, float, str))}}
                fh.write(json.dumps(row) + "\n")

    def log_samples(self, step: int, samples: Sequence[Any], k: int = 3) -> None:
        """The best and worst responses of a step (by reward) to samples.jsonl and the console."""
        if not self.enabled or not samples:
            return
        ranked = sorted(samples, key=lambda s: s.reward)
        picked = ranked[-((k + 1) // 2):] + ranked[:k // 2]
        rows = [{"step": step, "reward": s.reward, "advantage": s.advantage,
                 "response": s.response_text, "ground_truth": s.ground_truth, "index": s.index,
                 "finish_reason": s.finish_reason,
                 **{k2: v for k2, v in s.reward_extra.items() if isinstance(v, (int, float, str))}}
                for s in picked]
        if self.log_dir is not None:
            with open(self.log_dir / "samples.jsonl", "a") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
        for row in rows:
            text = (row["response"] or "")[:300].replace("\n", " ")
            print(f"  sample reward {row['reward']:.2f}: {text}", flush=True)
        if self._tb is not None:
            self._tb.add_text("samples", "\n\n".join(
                f"reward {r['reward']:.2f}: {r['response']}" for r in rows), step)

    def close(self) -> Optional[Path]:
        """Flush everything; write the curve PNG. Returns its path (or None)."""
        if not self.enabled:
            return None
        png = None
        if self.log_dir is not None and self.history:
            png = plot_curves(self.history, self.log_dir / "curves.png")
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        return png


def run_summary(history: Sequence[dict]) -> Optional[str]:
    """One line for the end of a run: mean reward (and format rate) of the first and the last
    quarter of the steps, and the first and last validation accuracy; None before 4 steps."""
    steps = [h for h in history if "reward_mean" in h]
    if len(steps) < 4:
        return None
    q = len(steps) // 4

    def mean(rows, key):
        vals = [h[key] for h in rows if key in h]
        return sum(vals) / len(vals) if vals else float("nan")

    def span(rows):
        return f"steps {int(rows[0]['step'])}-{int(rows[-1]['step'])}"

    first, last = steps[:q], steps[-q:]
    line = (f"reward {mean(first, 'reward_mean'):.3f} ({span(first)}) -> "
            f"{mean(last, 'reward_mean'):.3f} ({span(last)}); format rate "
            f"{mean(first, 'format_rate'):.3f} -> {mean(last, 'format_rate'):.3f}")
    val = [h for h in history if "val_acc" in h]
    if len(val) >= 2:
        line += (f"; validation accuracy {val[0]['val_acc']:.3f} (step {int(val[0]['step'])}) "
                 f"-> {val[-1]['val_acc']:.3f} (step {int(val[-1]['step'])})")
    return line


def plot_curves(history: Sequence[dict], path: os.PathLike) -> Path:
    """Reward per step and validation accuracy (where evaluated) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history if "reward_mean" in h]
    ax.plot(steps, [h["reward_mean"] for h in history if "reward_mean" in h], label="reward")
    val = [(h["step"], h["val_acc"]) for h in history if "val_acc" in h]
    if val:
        ax.plot([s for s, _ in val], [a for _, a in val], "o-", label="validation accuracy")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
