"""The policy's optimizer (training/model.py): which parameters weight decay applies to. One
spawned rank builds the tiny Qwen2.5-VL policy twice.

Proven: by default megatron-core's parameter groups leave biases and 1-D parameters (the norms)
undecayed; with --weight-decay-all-params every parameter is decayed at --weight-decay (the
reference's torch AdamW over all parameters). Not proven: the update itself (test_update.py).
"""

import pytest

from helpers import tiny_qwen
from helpers.distributed import run_on_ranks

pytestmark = pytest.mark.slow  # a spawned rank


def _decay_by_kind(state, path):
    from megatron_cppo.training.config import parse_config
    from megatron_cppo.training.model import build_policy

    out = {}
    for flags in ([], ["--weight-decay-all-params"]):
        cfg = parse_config(["--weight-decay", "0.1", *flags])
        policy = build_policy(path, state, cfg.model, cfg.optimizer)
        kinds = {}
        for group in policy.optimizer.param_groups:
            for p in group["params"]:
                kind = "1-d" if p.dim() == 1 else "matrix"
                kinds.setdefault(kind, set()).add(group["weight_decay"])
        out[bool(flags)] = {k: sorted(v) for k, v in kinds.items()}
    return out


def test_weight_decay_over_norms_and_biases_is_configurable(tmp_path):
    path = str(tmp_path / "hf")
    tiny_qwen.hf_config(tied=False).save_pretrained(path)
    (result,) = run_on_ranks(_decay_by_kind, 1, args=(path,), timeout=300)
    assert result[False] == {"1-d": [0.0], "matrix": [0.1]}
    assert result[True] == {"1-d": [0.1], "matrix": [0.1]}
