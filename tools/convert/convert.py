#!/usr/bin/env python
"""Checkpoint converter entry: the same CLI as the `megatron-cppo-convert` console script.

    python tools/convert/convert.py hf-to-megatron --hf-dir HF --out CKPT --tp 2 --pp 2
    python tools/convert/convert.py --help

Works from a checkout without installing the package (the repository root is put on sys.path).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_cppo.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
