"""``megatron-cppo``: one command, subcommands for the whole journey.

    megatron-cppo train [flags]      CPPO training (megatron_cppo.train; --help lists the flags)
    megatron-cppo eval [flags]       avg@N of --hf-dir / --load weights on benchmark files (vLLM
                                     alone; megatron_cppo/evaluate.py)
    megatron-cppo convert ...        HF <-> megatron checkpoints (megatron-cppo-convert's commands)
    megatron-cppo sft [flags]        supervised warm start only: --warm-start-iters N --save DIR

Exit status: 0 success, 1 a failed check (convert verify), 2 bad input.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = ("train", "eval", "convert", "sft")


def _usage() -> str:
    return __doc__.split("\n\n")[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: megatron-cppo {train,eval,convert,sft} ...\n\n" + _usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from megatron_cppo.train import main as train_main

        return train_main(rest)
    if command == "convert":
        from megatron_cppo.convert.cli import main as convert_main

        return convert_main(rest)
    if command == "eval":
        from megatron_cppo.evaluate import main as eval_main

        return eval_main(rest)
    if command == "sft":  # the warm start alone; --save gets the weights (train --load them)
        from megatron_cppo.train import main as train_main

        return train_main(["--sft-only"] + rest)
    print(f"error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
