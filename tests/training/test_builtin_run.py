"""The built-in default through the commands users type, as subprocesses without torchrun:
``megatron-cppo sft`` then ``megatron-cppo train --load`` with no model or data flags.

Proven: the built-in tiny Qwen2.5-VL (real Qwen2.5 tokenizer, 151,665 tokens; output layer padded
to 151,680 rows) and the built-in dataset are prepared offline into ``$MEGATRON_CPPO_CACHE`` once
(a second call rewrites nothing); a command outside torchrun launches itself on tp x pp local
ranks (the built-in config: TP 2); ``sft`` runs only the warm start (no rollout engine) and saves
a weights-only checkpoint (its logs under ./runs, not in --save); ``train --load`` finds the HF
directory that checkpoint records (for the tokenizer and the vLLM engine), keeps the built-in
config, skips the warm start and runs a CPPO step with vLLM rollouts, validation and finite
metrics; both exit 0. An existing ``--save`` is refused before any rank starts; an error only the
ranks see (a damaged shard) ends the run with the rank's status and one launcher line.
Not proven here: learning (benchmarks/RESULTS.md has the default run's curve).
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the commands users type, end to end

pytest.importorskip("vllm")


def _cli_env(cache) -> dict:
    """A user's environment: no torchrun variables, the built-in cache at ``cache``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(MEGATRON_CPPO_CACHE=str(cache), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore::UserWarning",
               PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]))
    return env


def _cli(args, cache, timeout=900, cwd=None):
    return subprocess.run([sys.executable, "-m", "megatron_cppo.cli", *args], env=_cli_env(cache),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_prepare_builtin_is_offline_and_idempotent(tmp_path):
    from transformers import AutoTokenizer

    from megatron_cppo.models.qwen2_5_vl import load_hf_config
    from megatron_cppo.training.builtin import MODEL_VOCAB, SEED, prepare_builtin

    hf, data = prepare_builtin(tmp_path)
    # a fixed seed, not the run's: the same files whether a run writes the cache or finds it
    assert json.loads(open(os.path.join(data, "builtin.json")).read())["seed"] == SEED
    assert len(AutoTokenizer.from_pretrained(hf)) == 151_665
    assert load_hf_config(hf).text_config.vocab_size == MODEL_VOCAB == 151_680
    files = sorted(os.listdir(data))
    assert {"train.parquet", "validation.parquet", "sft.parquet"} <= set(files)
    stamps = {p: os.stat(os.path.join(hf, p)).st_mtime_ns for p in os.listdir(hf)}
    assert prepare_builtin(tmp_path) == (hf, data)
    assert stamps == {p: os.stat(os.path.join(hf, p)).st_mtime_ns for p in os.listdir(hf)}


def test_sft_then_train_from_it(tmp_path):
    cache, sft = tmp_path / "cache", tmp_path / "sft"
    sft_args = ["sft", "--warm-start-iters", "2", "--global-batch-size", "4",
                "--micro-batch-size", "4", "--save", str(sft), "--no-progress"]
    r = _cli(sft_args, cache, cwd=tmp_path)  # no --log-dir: logs under ./runs, not in --save
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "launching 2 local ranks" in r.stdout
    (log_sft,) = (tmp_path / "runs").iterdir()
    warm = [json.loads(x) for x in (log_sft / "warm_start.jsonl").read_text().splitlines()]
    assert [x["warm_start_step"] for x in warm] == [1, 2]
    assert all(math.isfinite(x["sft_loss"]) for x in warm)
    assert (sft / "megatron_cppo.json").is_file() and not (sft / "trainer_state.pt").exists()
    assert not (log_sft / "metrics.jsonl").read_text()  # no CPPO step ran

    # an existing --save is refused before any rank starts (not after the warm start)
    r = _cli(sft_args, cache, cwd=tmp_path)
    assert r.returncode == 2 and "launching" not in r.stdout, r.stdout[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: --save: {sft} already exists; megatron-cppo sft writes a new checkpoint there "
        f"(remove it or choose another directory)")

    # an error only the ranks see (a damaged checkpoint shard) ends the run with the rank's
    # status and its one-line error naming the file last: no traceback, no launcher table
    damaged = tmp_path / "damaged"
    shutil.copytree(sft, damaged)
    shard = sorted((damaged / "model").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = _cli(["train", "--load", str(damaged), "--train-iters", "1", "--no-progress"], cache,
             cwd=tmp_path)
    assert r.returncode == 2 and "launching 2 local ranks" in r.stdout, \
        r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-3000:]
    assert shard.name in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr[-1000:]

    log = tmp_path / "log_train"
    r = _cli(["train", "--load", str(sft), "--train-iters", "1", "--eval-iters", "2",
              "--log-dir", str(log), "--no-progress"], cache)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "warm start" not in r.stdout  # the loaded weights are already warm-started
    rows = [json.loads(x) for x in (log / "metrics.jsonl").read_text().splitlines()]
    step = [m for m in rows if m.get("step") == 1]
    assert step, rows
    for k in ("loss", "reward_mean", "grad_norm", "rollout_vs_train_logprob_diff"):
        assert math.isfinite(step[0][k]), k
    assert any("val_acc" in m for m in rows)


def test_ranks_stop_when_the_launcher_is_killed(tmp_path):
    """``kill -9`` of the launcher (or the OOM killer taking it) while its local ranks train: they
    end within seconds instead of training on as orphans, each saying why, and leave no child
    process behind."""
    import signal
    import time

    psutil = pytest.importorskip("psutil")
    log = tmp_path / "console.txt"
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "megatron_cppo.cli", "sft", "--warm-start-iters", "1000",
             "--global-batch-size", "4", "--micro-batch-size", "4", "--save",
             str(tmp_path / "sft"), "--log-interval", "1", "--no-progress"],
            env=_cli_env(tmp_path / "cache"),
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    parent = psutil.Process(launcher.pid)
    family = []
    try:
        deadline = time.monotonic() + 300
        while "warm start 1/" not in log.read_text():  # the ranks are training
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        ranks = [p for p in parent.children() if "megatron_cppo.train" in " ".join(p.cmdline())]
        assert len(ranks) == 2, ranks
        family = ranks + [c for p in ranks for c in p.children(recursive=True)]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        gone, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, [(p.pid, " ".join(p.cmdline())[:80]) for p in alive]
        text = log.read_text()
        assert text.count(f"its launcher (pid {launcher.pid}) is gone; stopping") == 2, text[-3000:]
    finally:
        for p in [parent] + family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
