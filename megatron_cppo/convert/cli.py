"""megatron-cppo-convert: Hugging Face Qwen2.5-VL <-> megatron_cppo (megatron-core distributed)
checkpoints, at any tensor x pipeline parallel layout.

    megatron-cppo-convert hf-to-megatron --hf-dir Qwen2.5-VL-7B-Instruct --out ckpt/tp2pp2 \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    megatron-cppo-convert reshard --megatron-dir ckpt/tp2pp2 --out ckpt/tp4pp1 \
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1
    megatron-cppo-convert megatron-to-hf --megatron-dir ckpt/tp4pp1 --out Qwen2.5-VL-7B-cppo
    megatron-cppo-convert verify --hf-dir Qwen2.5-VL-7B-Instruct --megatron-dir ckpt/tp2pp2

The conversions live in ``megatron_cppo.convert.conversions`` (streaming, one parameter at a time;
names and transforms from ``models/qwen2_5_vl/mapping.py``), the logits check in
``megatron_cppo.convert.verify``. This module only parses flags, calls them and reports.

Exit codes: 0 success; 1 ``verify`` found the logits further apart than the tolerance; 2 bad or
damaged input (a one-line ``error: ...`` on stderr naming the file / tensor / setting, no traceback
unless ``--debug`` or MEGATRON_CPPO_DEBUG=1; no output and no temporary directory left behind);
128 + N interrupted by signal N (SIGTERM, SIGINT; partial output removed); 3 a bug (traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import textwrap
import threading
import traceback
from typing import Optional, Sequence

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_BUG = 0, 1, 2, 3

_EPILOG = """\
journeys:
  HF -> training layout   hf-to-megatron --hf-dir HF --out CKPT --tensor-model-parallel-size 2
                          (--tp 2 for short; --pipeline-model-parallel-size / --pp likewise)
  change the layout       reshard --megatron-dir CKPT --out CKPT2 --tp 4 --pp 1
  export for serving      megatron-to-hf --megatron-dir CKPT2 --out HF_OUT
  check a conversion      verify --hf-dir HF --megatron-dir CKPT

  verify a checkpoint's bytes check --megatron-dir CKPT

exit codes: 0 ok, 1 verify above tolerance, 2 bad input (one-line error, no output left behind),
128+N interrupted by signal N, 3 bug
"""


def _fill(text: str) -> str:
    # descriptions are wrapped here because the raw formatter (needed for the epilog tables)
    # would print them as one line
    return textwrap.fill(text, width=100)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def _size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    try:
        value = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 2GiB, got "
                                         f"{text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def _add_non_finite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-non-finite", action="store_true",
                   help="convert weights holding NaN or inf (refused by default: they are almost "
                        "always a damaged or diverged checkpoint)")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a previous output of this command (the old "
                        "directory is swapped out only when the new one is complete); never the "
                        "input, a directory containing it, or a directory of other files")
    p.add_argument("--no-progress", action="store_true",
                   help="do not draw the per-tensor progress bar (logs, CI)")


def _subcommand(sub, name: str, help: str, *, description: str, **extra):
    """One command of the converter: its one-line help and its description, wrapped."""
    return sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, help=help,
                          description=_fill(description), **extra)


def _add_layout_flags(p: argparse.ArgumentParser, *, target: bool) -> None:
    """The layout a command writes, with the trainer's (Megatron-LM's) flag names; ``target``:
    reshard's (TP and PP required), else hf-to-megatron's (default 1 x 1)."""
    what = "target " if target else ""
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=_positive_int,
                   metavar="N", **(dict(required=True) if target else dict(default=1)),
                   help=f"{what}tensor-model-parallel size (must divide the attention heads, "
                        f"query groups and MLP width)" + ("" if target else "; default 1"))
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=_positive_int,
                   metavar="M", **(dict(required=True) if target else dict(default=1)),
                   help=f"{what}pipeline-model-parallel size" + ("" if target else "; default 1")
                        + ". Where it does not divide the language model's layers and no split "
                          "is given, an uneven split is chosen (fewest layers on the first "
                          "stage) and printed")
    # the modes are validated by Qwen25VLModelConfig (one list of them; importing it here would
    # make --help load megatron-core)
    p.add_argument("--vision-parallel-mode", default="auto", metavar="MODE",
                   help=f"{what}vision tower layout: 'tp' shards it with the language model's "
                        f"TP, 'dp_in_tp' keeps whole ViT weights on every TP rank (images "
                        f"divided over the TP ranks), 'auto' (default) 'tp' when TP < 4 and TP "
                        f"divides the ViT's heads and MLP width, else 'dp_in_tp'")
    _add_split_flags(p)


def _add_split_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoder-first-pipeline-num-layers", type=_positive_int, default=None,
                   metavar="N",
                   help="language-model layers on the first pipeline stage (uneven split; that "
                        "stage also runs the vision tower); the stages without a fixed count "
                        "share the rest evenly")
    p.add_argument("--decoder-last-pipeline-num-layers", type=_positive_int, default=None,
                   metavar="N", help="language-model layers on the last pipeline stage")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="megatron-cppo-convert", formatter_class=raw, epilog=_EPILOG,
        description=_fill(
            "Convert Qwen2.5-VL checkpoints between Hugging Face directories and megatron_cppo "
            "checkpoints (megatron-core distributed checkpoints, reloadable at any tensor x "
            "pipeline parallel layout), reshard them, and verify a conversion against "
            "transformers."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- hf-to-megatron
    s = _subcommand(
        sub, "hf-to-megatron", "Hugging Face directory -> megatron_cppo checkpoint",
        description=(
            "Convert a Hugging Face Qwen2.5-VL directory (either key layout: "
            "model.language_model.* / model.visual.* or the older model.* / visual.*; tied or "
            "untied embeddings) into a megatron_cppo checkpoint for a TP x PP layout. Vocabulary "
            "rows are padded where TP does not divide the vocabulary. The source directory is "
            "recorded so that megatron-to-hf can copy its tokenizer and processor files."))
    s.add_argument("--hf-dir", required=True, metavar="DIR",
                   help="Hugging Face model directory (config.json + *.safetensors)")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoint directory to create (written to a temporary sibling and "
                        "renamed when complete)")
    _add_layout_flags(s, target=False)
    # the names are checked by the conversion against megatron_cppo.dtypes (the one table)
    s.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="dtype of the stored weights: bf16, fp16 or fp32 (default: the HF "
                        "config's torch_dtype, bf16 if it names none)")
    _add_non_finite_flag(s)
    _add_output_flags(s)

    # ---- megatron-to-hf
    s = _subcommand(
        sub, "megatron-to-hf", "megatron_cppo checkpoint -> Hugging Face directory",
        description=(
            "Export a megatron_cppo checkpoint (any layout) as a Hugging Face directory: "
            "safetensors shards with model.safetensors.index.json (tensor names in the key "
            "layout of the source HF directory recorded in the checkpoint, see --hf-layout; no "
            "lm_head for tied embeddings; vocabulary padding removed), config.json, "
            "generation_config.json, and the tokenizer / processor / chat-template files of the "
            "source HF directory."))
    s.add_argument("--megatron-dir", required=True, metavar="DIR",
                   help="megatron_cppo checkpoint directory (megatron_cppo.json + model/)")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="Hugging Face directory to create (temporary sibling + rename)")
    s.add_argument("--max-shard-size", type=_size, default=_size("5GB"), metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB (default, as save_pretrained), "
                        "500MB, 2GiB; more than one shard comes with model.safetensors.index.json")
    s.add_argument("--hf-layout", choices=("source", "transformers", "language_model"),
                   default="source",
                   help="tensor names: 'transformers' = model.embed_tokens, model.layers.*, "
                        "visual.*, lm_head (what save_pretrained and the released checkpoints "
                        "write); 'language_model' = model.language_model.*, model.visual.*, "
                        "lm_head; 'source' (default) = the layout of the HF directory the "
                        "checkpoint was converted from, 'transformers' if none is recorded")
    _add_non_finite_flag(s)
    _add_output_flags(s)

    # ---- reshard
    s = _subcommand(
        sub, "reshard", "megatron_cppo checkpoint -> the same at another TP x PP layout",
        description=(
            "Rewrite a megatron_cppo checkpoint for another TP x PP layout (the layout is "
            "validated against the model, the vocabulary padding adjusted). megatron-core loads "
            "a distributed checkpoint at another layout directly unless the padded vocabulary "
            "differs; a resharded checkpoint always loads as is."))
    s.add_argument("--megatron-dir", required=True, metavar="DIR",
                   help="source megatron_cppo checkpoint directory")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoint directory to create (temporary sibling + rename)")
    _add_layout_flags(s, target=True)
    _add_non_finite_flag(s)
    _add_output_flags(s)

    # ---- check
    s = _subcommand(
        sub, "check", "verify a checkpoint's metadata and stored bytes without building a model",
        description=(
            "Check a megatron_cppo checkpoint: its metadata against the model it describes "
            "(layout, vocabulary padding, stored shapes and dtypes) and the checksum of every "
            "stored chunk and file (model/ and extra state such as the optimizer). Names the "
            "first damaged tensor. A checkpoint written before checksums existed has every "
            "tensor read back instead, with a warning. Exit code 0 when intact, 2 otherwise."))
    s.add_argument("--megatron-dir", required=True, metavar="DIR",
                   help="megatron_cppo checkpoint directory (megatron_cppo.json + model/)")

    # ---- verify
    s = _subcommand(
        sub, "verify",
        "run transformers and the megatron checkpoint on a probe batch, compare logits",
        description=(
            "Run transformers' Qwen2_5_VLForConditionalGeneration (fp32) on --hf-dir and the "
            "megatron model loaded from --megatron-dir on the same probe batch; print the max "
            "abs logit difference and the mean per-token KL(HF || megatron) over valid tokens. "
            "The megatron model runs in fp32 from the checkpoint's weights, on tp x pp ranks of "
            "the checkpoint's layout launched here (gloo on CPU; nccl with CUDA, one GPU per "
            "rank). Exit code 1 above tolerance."),
        epilog="default tolerances (max abs logit diff / mean KL), by the checkpoint's dtype:\n"
               "  fp32        1e-4 / 1e-6\n"
               "  bf16, fp16  5% of the largest |HF logit| / 1e-3 (the stored weights are\n"
               "              rounded: an fp32 HF directory differs from them by that rounding)")
    s.add_argument("--hf-dir", required=True, metavar="DIR",
                   help="Hugging Face model directory to compare against (its processor is used "
                        "for the built-in probe when it has one)")
    s.add_argument("--megatron-dir", required=True, metavar="DIR",
                   help="megatron_cppo checkpoint directory")
    s.add_argument("--inputs", metavar="FILE", default=None,
                   help="torch file (torch.save of a dict) holding processor outputs: input_ids "
                        "and attention_mask [B, S], and for images pixel_values [P, patch_dim] "
                        "and image_grid_thw [N, 3]. Default: a built-in batch of a chat-like "
                        "text with one image and a text-only sample")
    s.add_argument("--dump-logits", metavar="FILE", default=None,
                   help="torch.save the megatron model's logits [B, S, V] (fp32, full "
                        "vocabulary without TP padding, in the layout of the inputs; padding "
                        "positions 0) to FILE")
    s.add_argument("--tolerance", type=_positive_float, default=None, metavar="ABS",
                   help="largest allowed max abs logit difference (default: by checkpoint "
                        "dtype, see below)")
    s.add_argument("--kl-tolerance", type=_positive_float, default=None, metavar="KL",
                   help="largest allowed mean per-token KL(HF || megatron) in nats (default: by "
                        "checkpoint dtype, see below)")
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true",
                             help="on an error, print its traceback as well (also "
                                  "MEGATRON_CPPO_DEBUG=1)")
        # whole flag names only (as Megatron-LM's parser): a removed flag that is a prefix of
        # a current one (--vision-parallel) is refused, not taken for it
        command.allow_abbrev = False
    return p


def _report(what: str, report, out: str) -> None:
    for note in getattr(report, "notes", ()):
        print(f"note: {note}", flush=True)
    print(f"{what}: {report.num_tensors} tensors, {report.bytes / 1e6:.1f} MB in "
          f"{report.seconds:.1f} s ({report.mb_per_s:.1f} MB/s) -> {out}", flush=True)


def _split(args: argparse.Namespace) -> dict:
    return dict(decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
                decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers)


def _run(args: argparse.Namespace) -> int:
    # imported here: `--help` and argument errors stay fast (no megatron / transformers import)
    from megatron_cppo.convert import conversions
    from megatron_cppo.platform import quiet_library_warnings

    quiet_library_warnings()

    progress = not getattr(args, "no_progress", False)
    if args.command == "hf-to-megatron":
        report = conversions.hf_to_megatron(
            args.hf_dir, args.out, tp=args.tp, pp=args.pp,
            vision_parallel_mode=args.vision_parallel_mode, dtype=args.dtype,
            overwrite=args.overwrite, progress=progress, **_split(args),
            allow_non_finite=args.allow_non_finite)
        _report("hf-to-megatron", report, args.out)
    elif args.command == "megatron-to-hf":
        report = conversions.megatron_to_hf(args.megatron_dir, args.out,
                                            overwrite=args.overwrite, progress=progress,
                                            max_shard_bytes=args.max_shard_size,
                                            hf_layout=None if args.hf_layout == "source"
                                            else args.hf_layout,
                                            allow_non_finite=args.allow_non_finite)
        _report("megatron-to-hf", report, args.out)
    elif args.command == "reshard":
        report = conversions.reshard(args.megatron_dir, args.out, tp=args.tp, pp=args.pp,
                                     vision_parallel_mode=args.vision_parallel_mode,
                                     overwrite=args.overwrite, progress=progress,
                                     **_split(args), allow_non_finite=args.allow_non_finite)
        _report("reshard", report, args.out)
    elif args.command == "check":
        r = conversions.check_checkpoint(args.megatron_dir)
        what = (f"{r.checked} stored chunks and files match their checksums" if r.checked
                else f"no checksums; {r.tensors} tensors read back")
        print(f"check: {r.directory}: ok (tp={r.meta.tp} pp={r.meta.pp} dtype={r.meta.dtype}; "
              f"{what}) in {r.seconds:.1f} s", flush=True)
    elif args.command == "verify":
        from megatron_cppo.convert.verify import verify

        result = verify(args.hf_dir, args.megatron_dir, inputs=args.inputs,
                        dump_logits=args.dump_logits, tolerance=args.tolerance,
                        kl_tolerance=args.kl_tolerance)
        print(result.summary(), flush=True)
        if args.dump_logits:
            print(f"megatron logits written to {args.dump_logits}", flush=True)
        if not result.passed:
            print(f"error: verify failed: {result.failure()}", file=sys.stderr, flush=True)
            return EXIT_VERIFY_FAILED
    else:  # argparse enforces the choices
        raise AssertionError(args.command)
    return EXIT_OK


class Interrupted(BaseException):
    """SIGTERM / SIGINT: unwinds like KeyboardInterrupt so that partial outputs are removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM (timeout, Slurm, Kubernetes) and SIGINT raise ``Interrupted`` in the main thread
    for the duration of a command; previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _user_error(e: BaseException) -> bool:
    return isinstance(e, (ValueError, OSError, EOFError))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MEGATRON_CPPO_DEBUG", "") not in ("", "0")
    try:
        with _signals_unwind():
            return _run(args)
    except BaseException as e:  # noqa: BLE001 - every way out becomes one line (module docstring)
        from megatron_cppo.convert.streaming import original_exception

        inner = original_exception(e) if not isinstance(e, (Interrupted, SystemExit)) else e
        if isinstance(inner, SystemExit):
            raise
        if isinstance(inner, (Interrupted, KeyboardInterrupt)):
            signum = getattr(inner, "signum", signal.SIGINT)
            print(f"error: interrupted by {signal.Signals(signum).name}; partial output "
                  f"removed", file=sys.stderr, flush=True)
            return 128 + int(signum)
        if debug or not _user_error(inner):
            traceback.print_exception(type(inner), inner, inner.__traceback__, file=sys.stderr)
            if not _user_error(inner):
                return EXIT_BUG
        # bad input (damaged files, an existing --out, unreadable paths): one line naming the
        # file / tensor / setting; a traceback would only bury it (--debug shows it)
        message = str(inner).strip().replace("\n", " | ") or type(inner).__name__
        if isinstance(inner, OSError) and inner.filename and str(inner.filename) not in message:
            message = f"{inner.filename}: {message}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
