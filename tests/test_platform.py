"""The CPU platform layer: inert at import, inert with CUDA, effective without it.

Each check runs in a fresh interpreter, because the layer is process-wide once active and the test
process itself may already have activated it.
"""

import subprocess
import sys
import textwrap

import pytest


def _run(code: str):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_import_patches_nothing():
    _run("""
        import importlib.util, os, sys
        import torch
        from torch.overrides import _get_current_function_mode_stack
        originals = {n: getattr(torch.cuda, n) for n in
                     ("current_device", "current_stream", "synchronize", "Stream", "Event")}
        import megatron_cppo
        from megatron_cppo import platform
        assert not platform.is_active()
        assert all(getattr(torch.cuda, n) is f for n, f in originals.items())
        assert not _get_current_function_mode_stack()
        assert "megatron.core" not in sys.modules  # nothing of megatron imported either
        # the one import-time measure is present exactly when it is needed
        spec = importlib.util.find_spec("megatron")
        has_leaf = any(os.path.exists(os.path.join(p, "core/transformer/moe/ops/paged_stash.py"))
                       for p in spec.submodule_search_locations)
        needed = has_leaf and importlib.util.find_spec("triton") is None
        assert (platform._PAGED_STASH in sys.modules) == needed
    """)


@pytest.mark.slow
def test_inactive_when_cuda_available():
    # Mock only the availability check: megatron and torch.cuda stay as they are.
    _run("""
        import torch
        torch.cuda.is_available = lambda: True
        current_device = torch.cuda.current_device
        from megatron_cppo import platform
        assert platform.activate() is False
        assert not platform.is_active()
        assert torch.cuda.current_device is current_device
        from megatron.core.tensor_parallel import random as mrandom
        assert mrandom._CUDA_RNG_STATE_TRACKER is None
        from megatron.core.optimizer import optimizer
        assert not hasattr(optimizer.clip_grad_by_total_norm_fp32, "_megatron_cppo_original")
        from torch.overrides import _get_current_function_mode_stack
        assert not _get_current_function_mode_stack()
    """)


@pytest.mark.slow
def test_active_without_cuda():
    _run("""
        import torch
        assert not torch.cuda.is_available()
        from megatron_cppo import platform
        assert platform.activate() is True and platform.activate() is True  # idempotent
        # 4/9: device="cuda" allocations land on the CPU; .cuda() is a no-op
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1).cuda().device.type == "cpu"
        assert torch.ones(1).to("cuda").device.type == "cpu"
        assert torch.cuda.current_device() == torch.device("cpu")
        torch.cuda.synchronize(); torch.cuda.current_stream().wait_stream(None)
        # 7: CUDA type names only inside the wrapped megatron functions
        assert torch.ones(1).type() == "torch.FloatTensor"
        # 3: megatron's RNG tracker forks a seeded CPU stream and restores the default one
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
        torch.manual_seed(0)
        before = torch.get_rng_state()
        with get_cuda_rng_tracker().fork():
            a = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before)
        with get_cuda_rng_tracker().fork():
            b = torch.rand(3)
        assert not torch.equal(a, b)  # the forked stream advances
        tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
        with get_cuda_rng_tracker().fork():
            assert torch.equal(torch.rand(3), a)  # reseeding reproduces it
        tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=1, ep_rank=0, etp_rank=0)
        with get_cuda_rng_tracker().fork():
            assert not torch.equal(torch.rand(3), a)  # another TP rank, another stream
        platform.deactivate()
        assert torch.zeros(1).device.type == "cpu"
        try:
            torch.cuda.current_device()
        except (AssertionError, RuntimeError):
            pass
        else:
            raise AssertionError("deactivate() did not restore torch.cuda.current_device")
    """)


@pytest.mark.slow
def test_qwen_vl_utils_import_leaves_no_torchvision_standin():
    out = _run("""
        import importlib.util, sys
        from megatron_cppo.platform import import_qwen_vl_utils
        qvu = import_qwen_vl_utils()
        print(qvu.smart_resize(480, 640, factor=28))
        if importlib.util.find_spec("torchvision") is None:
            assert "torchvision" not in sys.modules
        from PIL import Image
        img = Image.new("RGB", (64, 48), (255, 0, 0))
        msgs = [{"role": "user", "content": [{"type": "image", "image": img}]}]
        images, videos = qvu.process_vision_info(msgs)
        assert len(images) == 1 and images[0].size[0] % 28 == 0
    """)
    assert "(476, 644)" in out


def test_vpp_at_pp2_with_batched_p2p_is_refused():
    from megatron_cppo.parallel import ParallelConfig

    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size.*batch_p2p_comm"):
        ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                   batch_p2p_comm=False)
    ParallelConfig(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tensor_model_parallel_size=0), "^--tensor-model-parallel-size: must be an integer"),
    (dict(decoder_first_pipeline_num_layers=1), "^--decoder-first-pipeline-num-layers: needs"),
    (dict(virtual_pipeline_model_parallel_size=2), "needs pipeline_model_parallel_size > 1"),
    (dict(context_parallel_size=2), "context_parallel_size > 1 is not supported"),
    (dict(sequence_parallel=True), "sequence_parallel needs tensor_model_parallel_size > 1"),
])
def test_parallel_config_errors_name_the_field(kwargs, match):
    from megatron_cppo.parallel import ParallelConfig

    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)


def test_model_divisibility_errors():
    from megatron_cppo.parallel import ParallelConfig, check_model_divisibility

    with pytest.raises(ValueError, match="tensor-model-parallel-size 3 does not divide "
                                         "num_query_groups 2"):
        check_model_divisibility(ParallelConfig(tensor_model_parallel_size=3), num_layers=4,
                                 num_attention_heads=6, num_query_groups=2)
    with pytest.raises(ValueError, match="pipeline-model-parallel-size 8 .* larger than "
                                         "num_layers 4"):
        check_model_divisibility(ParallelConfig(pipeline_model_parallel_size=8), num_layers=4,
                                 num_attention_heads=4, num_query_groups=2)
