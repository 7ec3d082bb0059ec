"""The engine drops only the vLLM notices known to be harmless (rollout/engine.py
``_KNOWN_NOTICES``): the CPU worker's set_num_threads refusal and "Failed to load weights" for
the buffer-only layers; the same notice for any other layer, and every other record, still show."""

import logging

from megatron_cppo.rollout.engine import KnownNoticeFilter, quiet_known_notices


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def test_only_the_known_notices_are_dropped():
    keep = _Keep()
    root = logging.getLogger("notice_test")
    root.propagate = False
    root.addHandler(keep)
    quiet_known_notices("notice_test.")
    quiet_known_notices("notice_test.")  # once
    worker = logging.getLogger("notice_test.vllm.v1.worker.cpu_worker")
    reload = logging.getLogger("notice_test.vllm.model_executor.model_loader.reload.layerwise")
    for logger in (worker, reload):
        assert sum(isinstance(f, KnownNoticeFilter) for f in logger.filters) == 1
    worker.warning("CPU backend doesn't allow to use `torch.set_num_threads` after the thread "
                   "binding, skip it.")
    worker.warning("libtcmalloc is not found in LD_PRELOAD.")
    for layer in ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm"):
        reload.warning("%s: Failed to load weights", layer)
    reload.warning("%s: Failed to load weights", "QKVParallelLinear")
    assert keep.records == ["libtcmalloc is not found in LD_PRELOAD.",
                            "QKVParallelLinear: Failed to load weights"]
