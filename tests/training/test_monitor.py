"""The monitor: the end-of-run summary line (training/monitor.run_summary: quarter means of
reward and format rate over the logged steps, first and last validation accuracy), the samples
log, and progress bars drawn only on a terminal."""

import io
import sys

from megatron_cppo.training.monitor import Monitor, run_summary


def test_run_summary_quarters_and_validation():
    history = [{"step": 0, "val_acc": 0.25}]
    for step in range(1, 9):  # quarters of 2 steps: rewards 0.1, 0.2 | ... | 0.7, 0.8
        history.append({"step": step, "reward_mean": step / 10, "format_rate": 0.5 + step / 20})
    history.append({"step": 8, "val_acc": 0.5})
    assert run_summary(history) == (
        "reward 0.150 (steps 1-2) -> 0.750 (steps 7-8); format rate 0.575 -> 0.875; "
        "validation accuracy 0.250 (step 0) -> 0.500 (step 8)")
    no_val = [h for h in history if "val_acc" not in h]
    assert run_summary(no_val).endswith("format rate 0.575 -> 0.875")
    assert run_summary(no_val[:3]) is None  # fewer than 4 steps: no quarters


def test_sample_log_carries_the_records_fields(tmp_path, capsys):
    """samples.jsonl keeps, per logged response, its prompt's ground truth and row index, the
    sampler's finish reason and the reward's outputs (data/types.py's fields by name)."""
    import json

    import torch

    from megatron_cppo.data.types import Sample
    from megatron_cppo.training.monitor import Monitor

    samples = [Sample(prompt_ids=torch.tensor([1]), response_ids=torch.tensor([2]), group_id=0,
                      response_text=f"r{i}", ground_truth="7", index=40 + i,
                      finish_reason="stop", reward=float(i), reward_extra={"acc": float(i)})
               for i in range(2)]
    monitor = Monitor(log_dir=str(tmp_path), progress=False)
    monitor.log_samples(3, samples, k=2)
    monitor.close()
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["ground_truth"], r["finish_reason"], r["acc"]) for r in rows] == [
        (41, "7", "stop", 1.0), (40, "7", "stop", 0.0)]


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bars_only_on_a_terminal(monkeypatch):
    """Redirected to a file (how cluster jobs log), no bar is drawn: not one fragment reaches
    the log; on a terminal the bars are drawn unless --no-progress."""
    for tty, progress, drawn in ((False, True, False), (True, True, True), (True, False, False)):
        stream = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        items = list(Monitor(log_dir=None, progress=progress).progress(range(3), "update"))
        assert items == [0, 1, 2]
        assert ("update" in stream.getvalue()) == drawn, (tty, progress)
