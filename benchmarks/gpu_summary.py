"""One table from the GPU suite's parts (benchmarks/gpu_suite.sh): each measure next to its target.

    python benchmarks/gpu_summary.py DIR      # DIR: where gpu_suite.sh wrote its JSON files

Reads what the suite's parts wrote into DIR (a missing file: that part failed or was skipped, and
its rows say so):
  parts.tsv         name, exit status, seconds of every part (the GPU tests among them)
  model_step.json   benchmarks/model_step.py --json: 3B step, padded and packed, and transformers
  fit.json          benchmarks/model_step.py --memory-report --json: the 7B fit check
  loss_head.json    benchmarks/loss_head.py --json: the loss head variants and the HBM floor

Targets (GPU speed issue): model step MFU >= 40% with peak memory at or below transformers' for the
same work; the 7B configuration (4096 tokens, full recompute) fits one 80 GB GPU, or the table says
what does not; loss head (Triton) <= 1.5x the HBM floor, >= 10x faster than the Megatron-style
baseline, peak memory no higher than the torch path's. Correctness beside them: padded and packed
steps' losses (same weights and tokens) and the Triton head's outputs against the torch head's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_step import memory_budget  # noqa: E402

MFU_TARGET = 0.40
FLOOR_RATIO_TARGET = 1.5
SPEEDUP_TARGET = 10.0
LOSS_REL_TOL = 1e-2  # bf16 through 36 layers: padded and packed differ in rounding only
GIB = 2 ** 30


def _load(directory, name):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _met(ok):
    return "-" if ok is None else ("yes" if ok else "**no**")


def part_rows(directory):
    path = os.path.join(directory, "parts.tsv")
    if not os.path.exists(path):
        return [("suite parts", "no parts.tsv", "-", "-")]
    rows = []
    with open(path) as f:
        for line in f:
            name, rc, seconds = line.rstrip("\n").split("\t")
            rows.append((f"part: {name}", f"exit status {rc}, {seconds} s", "exit status 0",
                         _met(rc == "0")))
    return rows


def model_step_rows(data):
    if data is None:
        return [("model step", "not measured (part failed)", "-", "-")]
    rows = data["rows"]
    hf = next((r for r in rows if r["name"].startswith("transformers")), None)
    ours = [r for r in rows if r["name"].startswith("megatron_cppo")]
    out = []
    for r in ours:
        form = r["name"].split()[-1]
        mfu = r.get("mfu")
        out.append((f"step {form}: MFU", "-" if mfu is None else f"{mfu:.1%}",
                    f">= {MFU_TARGET:.0%}", _met(None if mfu is None else mfu >= MFU_TARGET)))
        if hf is not None:
            out.append((f"step {form}: time / transformers",
                        f"{r['step_s'] / hf['step_s']:.2f}x "
                        f"({r['step_s'] * 1e3:.0f} / {hf['step_s'] * 1e3:.0f} ms)", "-", "-"))
            if r.get("peak_gib") is not None and hf.get("peak_gib") is not None:
                out.append((f"step {form}: peak memory", f"{r['peak_gib']:.1f} GiB "
                            f"(transformers {hf['peak_gib']:.1f})", "<= transformers",
                            _met(r["peak_gib"] <= hf["peak_gib"])))
    losses = {r["name"].split()[-1]: r.get("loss") for r in ours}
    if losses.get("padded") is not None and losses.get("packed") is not None:
        a, b = losses["padded"], losses["packed"]
        rel = abs(a - b) / max(abs(a), 1e-12)
        out.append(("step: packed vs padded loss", f"{b:.5f} vs {a:.5f} (rel {rel:.1e})",
                    f"rel <= {LOSS_REL_TOL:g}", _met(rel <= LOSS_REL_TOL)))
    return out


def fit_rows(data, budget_gib):
    if data is None:
        return [("7B fit", "not measured (part failed)", "-", "-")]
    out = []
    for r in data["rows"]:
        if r.get("params") is None or r.get("peak_gib") is None:
            out.append(("7B fit", "not measured on CPU", "-", "-"))
            continue
        m = memory_budget(r["params"], r["static_gib"], r["peak_gib"], budget_gib)
        if m["fits"]:
            verdict = "fits"
        else:
            need = [("none fits" if n is None else f"DP >= {n}")
                    for n in (m["min_dp_shards"], m["min_dp_shards_ref_offload"])]
            verdict = (f"does not fit: distributed optimizer {need[0]}, "
                       f"{need[1]} with the reference offloaded")
        out.append(("7B, 4096 tokens, full recompute: one GPU",
                    f"{m['total_gib']:.1f} GiB (step peak {m['peak_gib']:.1f} + Adam "
                    f"{m['adam_gib']:.1f} + reference {m['reference_gib']:.1f}): {verdict}",
                    f"fits {budget_gib:g} GiB, or says what does not", _met(m["fits"])))
    return out


def loss_head_rows(data):
    if data is None:
        return [("loss head", "not measured (part failed)", "-", "-")]
    out = []
    floors = data.get("hbm_floor", {})
    for tokens in sorted({r["tokens"] for r in data["rows"]}):
        group = {r["variant"]: r for r in data["rows"] if r["tokens"] == tokens}
        fast, torch_path, base = (group.get(v) for v in ("cppo_triton", "cppo", "megatron"))
        if fast is None:
            out.append((f"T={tokens}: Triton head", "not measured", "-", "-"))
            continue
        floor = floors.get(str(tokens))
        if floor is not None:
            ratio = fast["time"] / floor["seconds"]
            out.append((f"T={tokens}: Triton time / HBM floor",
                        f"{ratio:.2f}x ({fast['time'] * 1e3:.2f} / {floor['seconds'] * 1e3:.2f} ms, "
                        f"{floor['bytes_per_s'] / 1e12:.2f} TB/s)",
                        f"<= {FLOOR_RATIO_TARGET:g}x", _met(ratio <= FLOOR_RATIO_TARGET)))
        if base is not None:
            speedup = base["time"] / fast["time"]
            out.append((f"T={tokens}: Megatron-style time / Triton time", f"{speedup:.1f}x",
                        f">= {SPEEDUP_TARGET:g}x", _met(speedup >= SPEEDUP_TARGET)))
        else:
            out.append((f"T={tokens}: Megatron-style baseline", "not run (memory budget)", "-",
                        "-"))
        if torch_path is not None:
            out.append((f"T={tokens}: Triton peak memory",
                        f"{fast['peak'] / GIB:.2f} GiB (torch path {torch_path['peak'] / GIB:.2f})",
                        "<= torch path", _met(fast["peak"] <= torch_path["peak"])))
            first = next(r for r in data["rows"] if r["tokens"] == tokens)
            if first["variant"] == "cppo":  # diff_vs_first is then the diff to the torch path
                diff = fast.get("diff_vs_first")
                out.append((f"T={tokens}: Triton vs torch outputs, max abs diff",
                            "-" if diff is None else f"{diff:.2e}", "-", "-"))
    return out


def summary(directory, budget_gib=79.0):
    rows = (part_rows(directory) + model_step_rows(_load(directory, "model_step.json"))
            + fit_rows(_load(directory, "fit.json"), budget_gib)
            + loss_head_rows(_load(directory, "loss_head.json")))
    lines = ["| measure | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", help="where gpu_suite.sh wrote its files")
    p.add_argument("--budget-gib", type=float, default=79.0)
    a = p.parse_args(argv)
    print("\nGPU suite summary")
    print(summary(a.directory, a.budget_gib))


if __name__ == "__main__":
    main()
