"""The whole trainer (training/run.py's phases over training/builder.py's run) on a tiny
Qwen2.5-VL with a recorded rollout, in one 2-rank launch at (tp, pp) = (1, 2), with the
distributed optimizer (its checkpoint path is the fragile one in megatron-core 0.16.1).

Proven:
- a 4-step run (save every 2 steps) logs finite metrics, refits the rollout engine once per step
  plus once at the start, writes metrics.jsonl, the curve PNG, and a checkpoint that the
  converter's reader accepts (``read_meta``) and ``megatron-to-hf`` exports (trained weights);
- resume is exact: 2 steps, exit (--exit-interval), --load, 2 more steps give bit-identical
  metrics at steps 3-4 to the uninterrupted run (loss, grad norm, every logged number except
  wall times);
- a save that fails on one rank mid-write (no space left) raises one account on every rank (the
  directory, the step, the cause, the last complete checkpoint), removes the partial directory
  and leaves ``latest`` naming the previous checkpoint, which the next run resumes from (the
  same bit-identical steps 3-4); on a real full disk (a 256 KB tmpfs, where this machine lets
  the test mount one) the first save fails the same way and leaves nothing under --save; with
  --continue-on-save-failure a failed periodic save is skipped and the run goes on;
- the model checkpoint reloads at another layout (tp, pp) = (2, 1): the resumed run's first
  old log-probs there (micro-batches filled to a token budget instead, padded rows with
  --no-sequence-packing where the other runs pack, layers recomputed with
  --recompute-granularity full) match the (1, 2) run's;
- validation (through the rollout source) runs at the start and at the last step; the
  generation dumps (--rollout-data-dir, --validation-data-dir) hold every response;
- --load reads the checkpoint's metadata once per rank, and a reference that starts from the
  loaded weights is copied from the policy;
- bf16 (the GPU configuration) runs 2 steps and saves, its first step within bf16 rounding of the
  fp32 run's loss, entropy and gradient norm.
Not proven: learning (the recorded rollout does not depend on the weights), vLLM.
"""

import contextlib
import errno
import json
import os
import subprocess

import pytest
import torch

from helpers.distributed import run_on_ranks

from helpers import recorded
from helpers import tiny_qwen

pytestmark = pytest.mark.slow  # trainer runs on 2 ranks

TIMING = ("time/", "tokens_per_s", "update_tokens_per_s")


def _argv(hf, save, *extra):
    # --data-path: the recorded prompts stand in for it (it must exist: no built-in data is made)
    return ["--hf-dir", hf, "--data-path", hf + "/config.json",
            "--pipeline-model-parallel-size", "2", "--rollout-batch-size", "2",
            "--n-samples-per-prompt", "4", "--global-batch-size", "4", "--micro-batch-size", "2",
            "--lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
            "--min-lr", "1e-4", "--cpl-coef", "0.5", "--rollout-temperature", "0.8",
            "--save", save, "--no-progress", "--sample-log-interval", "2",
            "--use-distributed-optimizer", *extra]


def _plugins(table):
    from megatron_cppo.training.plugins import Plugins

    def make(cfg, start, state):
        return Plugins(rollout=recorded.RecordedRollout(table),
                       prompts=recorded.RecordedPrompts(table), reward_fn=recorded.parity_reward,
                       valid_vocab=1500, val_prompts=[recorded.prompt_item(table, p)
                                                      for p in (0, 1)])

    return make


@contextlib.contextmanager
def _counting_metadata_reads():
    """The checkpoint-metadata reads of a run (every module that reads it, patched)."""
    import megatron_cppo.checkpoint.store as store
    import megatron_cppo.training.start as start

    reads, originals = [], {m: m.read_meta for m in (store, start)}

    def counting(path):
        reads.append(os.path.basename(os.path.normpath(str(path))))
        return originals[start](path)

    for m in originals:
        m.read_meta = counting
    try:
        yield reads
    finally:
        for m, f in originals.items():
            m.read_meta = f


def _runs(ranks, hf, root, disk):
    import megatron_cppo.training.checkpoint as ckpt
    from megatron_cppo.training.config import parse_config, replace
    from megatron_cppo.training.run import run as run_phases
    from megatron_cppo.training.start import resolve_start

    def run(cfg, make_plugins):
        return run_phases(*resolve_start(cfg), make_plugins)

    table = recorded.record_rollout()
    out = {}
    full = os.path.join(root, "full")
    out["full"] = run(parse_config(_argv(hf, full, "--train-iters", "4", "--save-interval", "2",
                                         "--rollout-data-dir", os.path.join(root, "dump_train"),
                                         "--validation-data-dir",
                                         os.path.join(root, "dump_val"))), _plugins(table))
    half = os.path.join(root, "half")
    out["first_half"] = run(parse_config(_argv(hf, half, "--train-iters", "4",
                                                   "--exit-interval", "2")), _plugins(table))
    # a save that dies on rank 1 after the model and optimizer were written (its RNG file)
    original = torch.save

    def failing(obj, path, *a, **k):
        if ranks.rank == 1 and "rng" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(obj, path, *a, **k)

    torch.save = failing
    try:
        run(parse_config(_argv(hf, half, "--train-iters", "4", "--exit-interval", "3",
                              "--load", half)), _plugins(table))
        out["failed_save"] = "no error"
    except ckpt.CheckpointSaveError as e:
        out["failed_save"] = str(e)
    finally:
        torch.save = original
    out["latest_after_failure"] = open(os.path.join(half, "latest")).read().strip()
    out["partials"] = ckpt.list_partial(half)
    # --continue-on-save-failure: step 2's save fails on rank 1, steps 3 and its save go on
    cont = os.path.join(root, "continued")

    def failing_once(obj, path, *a, **k):
        if ranks.rank == 1 and "rng" in str(path) and ".iter_0000002." in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(obj, path, *a, **k)

    torch.save = failing_once
    try:
        steps = run(parse_config(_argv(hf, cont, "--train-iters", "3", "--save-interval", "1",
                                       "--continue-on-save-failure")), _plugins(table))
    finally:
        torch.save = original
    out["continued"] = (len(steps), open(os.path.join(cont, "latest")).read().strip(),
                        sorted(n for n in os.listdir(cont) if "iter_" in n))
    # a real full disk: a tmpfs too small for the first checkpoint (needs mount rights)
    if disk is not None:
        try:
            run(parse_config(_argv(hf, os.path.join(disk, "save"), "--train-iters", "1",
                                   "--save-interval", "1")), _plugins(table))
            out["full_disk"] = "no error"
        except ckpt.CheckpointSaveError as e:
            out["full_disk"] = str(e)
        out["full_disk_left"] = sorted(os.listdir(os.path.join(disk, "save")))
    with _counting_metadata_reads() as reads:
        out["second_half"] = run(parse_config(_argv(hf, half, "--train-iters", "4", "--load",
                                                    half)), _plugins(table))
    out["second_half_meta_reads"] = list(reads)
    # the model at another layout (weights only, fresh optimizer): one step's old log-probs
    other = parse_config(_argv(hf, os.path.join(root, "other"), "--train-iters", "1",
                               "--load", os.path.join(full, "iter_0000002"), "--no-load-optim",
                               "--max-tokens-per-microbatch", "120", "--no-sequence-packing",
                               "--recompute-granularity", "full"))
    other = replace(other, parallel=dict(tensor_model_parallel_size=2,
                                         pipeline_model_parallel_size=1))
    with _counting_metadata_reads() as reads:  # the reference: a copy of the loaded policy
        out["other_layout"] = run(other, _plugins(table))
    out["other_layout_meta_reads"] = list(reads)
    # what GPU runs use: bf16 weights and activations (fp32 main weights and gradient buffers in
    # megatron's optimizer), packed micro-batches (the default); 2 steps and a save
    out["bf16"] = run(parse_config(_argv(hf, os.path.join(root, "bf16"), "--train-iters", "2",
                                         "--save-interval", "2", "--bf16")), _plugins(table))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    hf = str(root / "hf")
    tiny_qwen.hf_model(tiny_qwen.hf_config(tied=False), seed=4).save_pretrained(hf)
    disk = root / "small_disk"
    disk.mkdir()
    try:  # a real small disk where this machine allows it (root with CAP_SYS_ADMIN)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):  # no mount command
        mounted = False
    try:
        per_rank = run_on_ranks(_runs, 2, megatron=False, timeout=1200,
                                args=(hf, str(root), str(disk) if mounted else None))
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], capture_output=True)
    return root, per_rank


def _comparable(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING)}


def test_run_completes_with_finite_metrics_and_outputs(runs):
    root, per_rank = runs
    full = per_rank[0]["full"]
    assert [m["step"] for m in full] == [1.0, 2.0, 3.0, 4.0]
    for m in full:
        for k in ("loss", "pg_loss", "kl_loss", "cpl_loss", "grad_norm", "reward_mean",
                  "rollout_vs_train_logprob_diff", "entropy", "perception_token_frac"):
            assert k in m and torch.isfinite(torch.tensor(m[k])), k
        assert m["skipped_steps"] == 0 and m["weight_version"] == m["step"]
    assert any(m["perturbed_rows"] > 0 for m in full)
    # 2 optimizer steps per rollout step: warm-up to the peak after step 1, then cosine decay
    assert full[0]["lr"] == pytest.approx(1e-3) and full[1]["lr"] < 1e-3
    assert full[3]["lr"] == pytest.approx(1e-4)
    assert per_rank[1]["full"] == per_rank[0]["full"] or all(
        _comparable(a) == _comparable(b) for a, b in zip(per_rank[0]["full"], per_rank[1]["full"]))
    lines = (root / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3, 4]  # 0: validation at start
    assert "val_acc" in json.loads(lines[0]) and "val_acc" in full[-1]
    assert all("val_acc" not in m for m in full[:-1])
    assert (root / "full" / "curves.png").stat().st_size > 1000
    # the generation dumps: every training response per step, every validation one
    assert sorted(p.name for p in (root / "dump_train").iterdir()) == [
        f"{k}.jsonl" for k in (1, 2, 3, 4)]
    rows = [json.loads(x) for x in (root / "dump_train" / "3.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["input"] for r in rows} == {"prompt 0", "prompt 1"}
    assert all(set(r) >= {"output", "score", "advantage", "ground_truth", "index"} for r in rows)
    assert sorted(p.name for p in (root / "dump_val").iterdir()) == ["0.jsonl", "4.jsonl"]
    assert (root / "full" / "samples.jsonl").is_file()
    from megatron_cppo.checkpoint import read_meta

    assert read_meta(str(root / "full" / "iter_0000004")).pp == 2
    assert (root / "full" / "latest").read_text().strip() == "iter_0000004"


def test_converter_exports_a_training_checkpoint(runs, tmp_path):
    from safetensors.torch import load_file

    from megatron_cppo.convert.conversions import megatron_to_hf

    root, _ = runs
    megatron_to_hf(str(root / "full" / "iter_0000004"), str(tmp_path / "hf"), progress=False)
    tensors = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    start = {}
    for f in (root / "hf").glob("*.safetensors"):
        start.update(load_file(str(f)))
    assert len(tensors) == len(start)  # every weight exported (names follow the exporter)
    assert any(not torch.equal(t, start[k]) for k, t in tensors.items() if k in start)


def test_resume_is_bit_identical(runs):
    _, per_rank = runs
    for rank in per_rank:
        full, first, second = rank["full"], rank["first_half"], rank["second_half"]
        assert [_comparable(m) for m in first] == [_comparable(m) for m in full[:2]]
        assert [m["step"] for m in second] == [3.0, 4.0]
        assert [_comparable(m) for m in second] == [_comparable(m) for m in full[2:]]


def test_failed_save_keeps_previous_checkpoint(runs):
    root, per_rank = runs
    half = root / "half"
    for rank in per_rank:
        # every rank raises the same account: directory, step, cause, what is still there
        assert rank["failed_save"] == (
            f"--save {half}: the checkpoint of step 3 was not written: no space left on device "
            f"(errno 28); the last complete checkpoint is {half / 'iter_0000002'} (nothing "
            f"partial is left behind)")
        assert rank["latest_after_failure"] == "iter_0000002"
        assert rank["partials"] == []


def test_training_goes_on_after_a_failed_save_when_asked(runs):
    _, per_rank = runs
    for rank in per_rank:  # 3 steps ran; step 2's checkpoint is missing, nothing partial
        assert rank["continued"] == (3, "iter_0000003", ["iter_0000001", "iter_0000003"])


def test_a_full_disk_fails_the_save_with_its_cause(runs):
    """--save on a 256 KB tmpfs: the first checkpoint does not fit; one account of it, nothing
    half-written left under --save (the run's logs, written there by default, fit)."""
    root, per_rank = runs
    if "full_disk" not in per_rank[0]:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    save = root / "small_disk" / "save"
    for rank in per_rank:
        assert rank["full_disk"].startswith(
            f"--save {save}: the checkpoint of step 1 was not written: no space left on device")
        assert rank["full_disk"].endswith("there is no complete checkpoint yet (nothing partial "
                                          "is left behind)")
        # the run's logs (metrics.jsonl, ...) are there; no checkpoint, partial or latest file
        assert not [n for n in rank["full_disk_left"] if "iter_" in n or "latest" in n], \
            rank["full_disk_left"]


def test_the_start_point_is_read_once(runs):
    """--load reads the checkpoint's metadata once per rank (training/start.py), not once per
    consumer; the reference of a run that starts from the loaded weights is copied from the
    policy, not read from disk again."""
    _, per_rank = runs
    for rank in per_rank:
        assert rank["second_half_meta_reads"] == ["iter_0000002"]  # the latest of "half"
        assert rank["other_layout_meta_reads"] == ["iter_0000002"]


def test_model_reloads_at_another_layout(runs):
    _, per_rank = runs
    other = per_rank[0]["other_layout"]
    full = per_rank[0]["full"]
    assert [m["step"] for m in other] == [1.0]  # weights only: counters and data restart
    # the weights of step 2 and the batch of step 3 (the recorded prompts cycle every 2 steps):
    # the trainer's old log-probs, seen through the sampler-diff metric, are the same
    assert other[0]["rollout_vs_train_logprob_diff"] == pytest.approx(
        full[2]["rollout_vs_train_logprob_diff"], rel=1e-5)


def test_bf16_packed_run(runs):
    """--bf16 (the GPU configuration; packed micro-batches) on the same recorded rollouts: finite
    metrics, steps taken, and the first step's numbers within bf16 rounding of the fp32 run's
    (same start weights and batch)."""
    root, per_rank = runs
    bf16, full = per_rank[0]["bf16"], per_rank[0]["full"]
    assert [m["step"] for m in bf16] == [1.0, 2.0]
    for m in bf16:
        for k in ("loss", "pg_loss", "kl_loss", "cpl_loss", "grad_norm", "entropy"):
            assert torch.isfinite(torch.tensor(m[k])), k
        assert m["skipped_steps"] == 0
    # measured: loss -0.1395 vs -0.1400, grad norm 8.399 vs 8.445, entropy equal to 3e-5
    first, ref = bf16[0], full[0]
    assert first["loss"] == pytest.approx(ref["loss"], abs=0.005)
    assert first["entropy"] == pytest.approx(ref["entropy"], rel=0.01)
    assert first["grad_norm"] == pytest.approx(ref["grad_norm"], rel=0.02)
    assert first["rollout_vs_train_logprob_diff"] == pytest.approx(
        ref["rollout_vs_train_logprob_diff"], rel=0.01)
    assert (root / "bf16" / "latest").read_text().strip() == "iter_0000002"
