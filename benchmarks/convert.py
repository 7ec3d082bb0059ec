"""Converter throughput and peak memory against a plain copy of the same safetensors files.

    python benchmarks/convert.py                       # ~360 MB bf16 checkpoint, TP2 PP2
    python benchmarks/convert.py --hidden 1024 --layers 16 --tp 2 --pp 2 --reps 3

Writes a random Qwen2.5-VL checkpoint in the Hugging Face format (real vocabulary 151936, untied,
text hidden ``--hidden`` x ``--layers`` layers with GQA, a small ViT; bf16, sharded safetensors
with an index, pre-4.52 key names as the released Qwen2.5-VL checkpoints use), then measures in
the same run, on the same disk:
  (a) copy       ``shutil.copytree`` of its safetensors files (the kernel's copy path);
  (b) hf->mc     ``megatron-cppo-convert hf-to-megatron --tp TP --pp PP``;
  (c) reshard    ``reshard`` of (b) to TP1 PP1;
  (d) mc->hf     ``megatron-to-hf`` of (b);
  (e) check      ``check`` of (b) (metadata + every stored chunk's CRC-32, no model);
and (b)-(d) once more with checksums off (``checksums=False``: nothing computed on write, nothing
verified on read), interleaved with the default runs, for the cost of the checksums.
MB/s = checkpoint size (the HF safetensors bytes) / seconds, for every row, so the ratios compare
the same amount of model. Each conversion runs in a fresh process that imports the converter
first, then converts: its seconds exclude interpreter start and imports. Memory: the process's
peak RSS (VmHWM, includes the imports and the safetensors files' mmapped page cache), and the peak
anonymous RSS above the level after imports (sampled every 10 ms), next to the checkpoint size and
its largest tensor (the streaming bound: a few copies of the largest parameter). The source
files are in the page cache for every row (just written); nothing is fsynced. Median over
``--reps``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def hf_config(hidden: int, layers: int, vocab: int):
    from transformers import Qwen2_5_VLConfig

    heads = hidden // 64
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(heads // 4, 1), rms_norm_eps=1e-6,
                max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [8, 12, 12]},  # head_dim 64
                tie_word_embeddings=False)
    vision = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, in_channels=3,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  fullatt_block_indexes=[1, 3], out_hidden_size=hidden, hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            dtype="bfloat16")


def write_checkpoint(path: Path, config, shard_bytes: int) -> tuple[int, int]:
    """Random bf16 tensors of every expected shape, streamed into sharded safetensors (never the
    whole model in memory). Returns (total bytes, largest tensor bytes)."""
    import torch

    from megatron_cppo.checkpoint.safetensors_io import ShardedSafetensorsWriter
    from megatron_cppo.convert.hf_source import expected_hf_shapes
    from megatron_cppo.models.qwen2_5_vl import mapping

    path.mkdir(parents=True)
    shapes = expected_hf_shapes(config)
    specs = [(mapping.to_old_layout(k), s, torch.bfloat16) for k, s in shapes.items()]
    writer = ShardedSafetensorsWriter(path, specs, max_shard_bytes=shard_bytes)
    g = torch.Generator().manual_seed(0)
    largest = 0
    for name, shape, _ in specs:
        t = torch.randn(shape, generator=g) * 0.02
        if "norm" in name or "ln_q" in name:
            t = t + 1.0
        t = t.to(torch.bfloat16)
        largest = max(largest, t.numel() * 2)
        writer.write(name, t)
    writer.close()
    config.save_pretrained(path)
    return writer.bytes_written, largest


# ----------------------------------------------------------------------------------------------
# one conversion in a fresh process


def _status(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name = line.split(":")[0]
            if name in keys:
                out[name] = int(line.split()[1]) * 1024
    return out


class AnonPeak:
    """Peak anonymous RSS (RssAnon, sampled every 10 ms in a thread). The kernel's own peak
    (VmHWM) also counts file pages mapped by safetensors' mmap reads, which are page cache the
    kernel can drop, not memory the conversion holds."""

    def __init__(self):
        import threading

        self.peak = _status("RssAnon")["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status("RssAnon")["RssAnon"])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status("RssAnon")["RssAnon"])


def _run_api(argv: list[str], checksums: bool) -> int:
    """The CLI's command, through the API so that checksums can be turned off."""
    from megatron_cppo.convert import cli, conversions

    a = cli.build_parser().parse_args(argv)
    if a.command == "hf-to-megatron":  # both variants through the same API calls
        conversions.hf_to_megatron(a.hf_dir, a.out, tp=a.tp, pp=a.pp, progress=False,
                                   checksums=checksums)
    elif a.command == "reshard":
        conversions.reshard(a.megatron_dir, a.out, tp=a.tp, pp=a.pp, progress=False,
                            checksums=checksums)
    elif a.command == "megatron-to-hf":
        conversions.megatron_to_hf(a.megatron_dir, a.out, progress=False, checksums=checksums)
    elif checksums:
        return cli.main(argv)
    else:
        raise SystemExit(f"no checksum-free variant of {a.command}")
    return 0


def worker(spec: dict) -> None:
    """Import the converter, note the memory after imports, convert, print a JSON line."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_cppo.convert import cli, conversions  # noqa: F401 (import cost)
    from megatron_cppo.models.qwen2_5_vl import builder  # noqa: F401
    import transformers  # noqa: F401

    # not getrusage(RUSAGE_SELF).ru_maxrss: Linux carries it over fork + exec from the parent,
    # so a fresh worker would start at the benchmark's own peak; VmHWM is this process's own
    base = _status("VmHWM", "RssAnon")
    sampler = AnonPeak()
    t0 = time.perf_counter()
    rc = _run_api(spec["argv"], spec.get("checksums", True))
    seconds = time.perf_counter() - t0
    anon_peak = sampler.stop()
    print("RESULT " + json.dumps(dict(rc=rc, seconds=seconds, peak=_status("VmHWM")["VmHWM"],
                                      import_peak=base["VmHWM"], anon_peak=anon_peak,
                                      import_anon=base["RssAnon"])), flush=True)


def run_worker(argv: list[str], checksums: bool = True) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, __file__, "--worker",
                           json.dumps(dict(argv=argv, checksums=checksums))],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"conversion {argv[0]} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    if out["rc"] != 0:
        sys.exit(f"conversion {argv[0]} returned {out['rc']}:\n{proc.stderr[-4000:]}")
    return out


def timed_copy(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names
                                                       if not n.endswith(".safetensors")])
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512,
                   help="text hidden size (heads = hidden / 64; MLP 2.75 x hidden)")
    p.add_argument("--layers", type=int, default=8, help="text layers")
    p.add_argument("--vocab", type=int, default=151936,
                   help="vocabulary rows (151936 as Qwen2.5-VL-3B)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of hf-to-megatron")
    p.add_argument("--pp", type=int, default=2, help="pipeline-parallel size of hf-to-megatron")
    p.add_argument("--reps", type=int, default=1,
                   help="repetitions of every measurement (median reported; the copy runs "
                        "max(3, reps) times)")
    p.add_argument("--shard-mb", type=int, default=200,
                   help="safetensors shard size of the generated checkpoint, MB")
    p.add_argument("--workdir", default=None,
                   help="where to write (default: a temporary directory under /tmp, removed "
                        "afterwards)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="mcppo_bench_convert_"))
    try:
        config = hf_config(args.hidden, args.layers, args.vocab)
        hf = root / "hf"
        size, largest = write_checkpoint(hf, config, args.shard_mb * 10**6)
        print(f"checkpoint: {size / 1e6:.1f} MB bf16 in "
              f"{len(list(hf.glob('*.safetensors')))} files, largest tensor "
              f"{largest / 1e6:.1f} MB; hidden {args.hidden}, {args.layers} layers, vocab "
              f"{args.vocab}, untied", flush=True)

        rows: dict[str, list] = {"copy": [], "hf->mc": [], "hf->mc no checksums": [],
                                 "reshard": [], "reshard no checksums": [], "mc->hf": [],
                                 "mc->hf no checksums": [], "check": []}
        for i in range(max(3, args.reps)):
            rows["copy"].append(dict(seconds=timed_copy(hf, root / f"copy{i}")))
            shutil.rmtree(root / f"copy{i}")
        for i in range(args.reps):
            for crc in ((True, False) if i % 2 == 0 else (False, True)):  # alternate the order
                tag = "" if crc else " no checksums"
                mc, rs, back = root / f"mc{i}{crc}", root / f"rs{i}{crc}", root / f"back{i}{crc}"
                rows["hf->mc" + tag].append(run_worker(
                    ["hf-to-megatron", "--hf-dir", str(hf), "--out", str(mc), "--tp",
                     str(args.tp), "--pp", str(args.pp), "--no-progress"], crc))
                rows["reshard" + tag].append(run_worker(
                    ["reshard", "--megatron-dir", str(mc), "--out", str(rs), "--tp", "1", "--pp",
                     "1", "--no-progress"], crc))
                rows["mc->hf" + tag].append(run_worker(
                    ["megatron-to-hf", "--megatron-dir", str(mc), "--out", str(back),
                     "--no-progress"], crc))
                if crc:
                    rows["check"].append(run_worker(["check", "--megatron-dir", str(mc)]))
                for d in (mc, rs, back):
                    shutil.rmtree(d)

        # the checksum work alone, in this process, on a written checkpoint: what the default
        # runs spend on top of the "no checksums" ones (computing after a write = one re-read
        # + CRC of model/; verifying before a read = the same)
        from megatron_cppo.checkpoint import integrity

        mc = root / "mc_crc"
        run_worker(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(mc), "--tp",
                    str(args.tp), "--pp", str(args.pp), "--no-progress"])
        crc_s = []
        for _ in range(max(3, args.reps)):
            t0 = time.perf_counter()
            integrity.verify(mc, ["model"], expected=True)
            crc_s.append(time.perf_counter() - t0)
        crc_bytes = integrity.total_bytes(mc / "model")
        shutil.rmtree(mc)

        copy_s = statistics.median(r["seconds"] for r in rows["copy"])
        print("\n| step | seconds | MB/s | vs copy | peak RSS (VmHWM) | peak anonymous RSS over "
              "imports | / largest tensor |")
        print("|---|---|---|---|---|---|---|")
        for name, runs in rows.items():
            s = statistics.median(r["seconds"] for r in runs)
            mem = ("-", "-", "-")
            if name != "copy":
                peak = statistics.median(r["peak"] for r in runs)
                anon = statistics.median(r["anon_peak"] - r["import_anon"] for r in runs)
                mem = (f"{peak / 1e6:.0f} MB", f"{anon / 1e6:.0f} MB", f"x{anon / largest:.1f}")
            print(f"| {name} | {s:.2f} | {size / 1e6 / s:.0f} | x{copy_s / s:.3f} | "
                  + " | ".join(mem) + " |")
        print("\n| step | with checksums s | without s | with / without |")
        print("|---|---|---|---|")
        for name in ("hf->mc", "reshard", "mc->hf"):
            w = statistics.median(r["seconds"] for r in rows[name])
            wo = statistics.median(r["seconds"] for r in rows[name + " no checksums"])
            print(f"| {name} | {w:.2f} | {wo:.2f} | x{w / wo:.3f} |")
        s = statistics.median(crc_s)

        def med(name):
            return statistics.median(r["seconds"] for r in rows[name])

        print(f"\nchecksums alone (CRC-32 of every stored chunk of model/, {crc_bytes / 1e6:.0f} "
              f"MB): {s:.2f} s = {crc_bytes / 1e6 / s:.0f} MB/s; per conversion that is "
              + ", ".join(f"{name} {passes} pass(es) = {100 * passes * s / med(name):.0f}%"
                          for name, passes in (("hf->mc", 1), ("reshard", 2), ("mc->hf", 1)))
              + " of its time")
        print(f"\n(checkpoint {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB; "
              f"hf->mc at TP{args.tp} PP{args.pp}, reshard to TP1 PP1)")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
