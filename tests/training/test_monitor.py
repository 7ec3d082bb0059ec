"""The end-of-run summary line (training/monitor.run_summary): quarter means of reward and
format rate over the logged steps, first and last validation accuracy."""

from megatron_cppo.training.monitor import run_summary


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
