"""Command line: train a concept vector and print a question's unsteered and steered answers.

    python -m steer_utils steer --model smollm2-135m --concept "fears/heights" \\
        --question "What should I do this weekend?" [--coefficients 0.025 0.05] [--max-new-tokens 40] \\
        [--statements 32] [--setting attention-soft-rfm] [--protocol paper]

Errors (an unknown model, a bad concept or setting) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence

# Mirrors pipeline.COEFFICIENTS (checked by tests/test_api.py); not imported, so --help and usage errors skip torch.
DEFAULT_COEFFICIENTS = (0.015, 0.025, 0.035, 0.05)


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit; one line is enough
        raise UsageError(message)


def _positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("+").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _coefficient(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number such as 0.035, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `python -m steer_utils` argument parser (subcommand `steer`)."""
    parser = _Parser(prog="python -m steer_utils", description="Steer a language model with a concept vector.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    steer = commands.add_parser(
        "steer",
        help="train a concept vector and print unsteered and steered answers",
        description="Train a concept vector (the adopted protocol) and answer one question "
        "unsteered and at each coefficient.",
    )
    steer.add_argument(
        "--model",
        required=True,
        help="a bundled name (smollm2-135m, gemma3-270m), a Hugging Face id in the local cache or a local folder",
    )
    steer.add_argument("--concept", required=True, help="'<class>/<name>', e.g. 'fears/heights'")
    steer.add_argument("--question", required=True, help="the question to answer")
    steer.add_argument(
        "--coefficients",
        type=_coefficient,
        nargs="+",
        default=list(DEFAULT_COEFFICIENTS),
        metavar="EPS",
        help="eps relative to each block's hidden-state norm (default: %(default)s)",
    )
    steer.add_argument("--max-new-tokens", type=_positive_int, default=40, help="answer length cap (default: 40)")
    steer.add_argument(
        "--statements",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on the first N bundled statements (default: 64, the default profile's)",
    )
    steer.add_argument(
        "--setting", default="attention-soft-rfm", help="token selection-labels-method (default: %(default)s)"
    )
    steer.add_argument(
        "--protocol", default=None, help="'paper' or fields such as 'contrast=3' (default: the adopted protocol)"
    )
    steer.add_argument("--seed", type=int, default=0, help="RFM split seed (default: 0)")
    steer.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, ...")
    steer.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser


def run_steer(args: argparse.Namespace, out=None) -> None:
    """Train the vector and print the unsteered answer, then the steered answer at each coefficient."""
    from . import api  # imports torch, so only once a command runs (--help and usage errors start without it)
    from .core import protocol, training

    out = out or sys.stdout
    # Check every input before the model loads.
    concept_class, name = api.parse_concept(args.concept)
    statements = api.resolve_statements(args.statements)  # the first N bundled ones
    training.Setting.parse(args.setting)
    chosen = protocol.resolve_protocol(args.protocol)  # the vector records it: apply and generate follow it
    model, tokenizer, info = api.load_model(args.model, dtype=args.dtype, device=args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vector = api.train_concept_vector(
            model,
            tokenizer,
            f"{concept_class}/{name}",
            model_name=info.name,
            statements=statements,
            setting=args.setting,
            protocol=chosen,
            seed=args.seed,
        )
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    blocks = sorted(vector.directions)
    print(
        f"{concept_class}/{name} on {info.name}: {vector.metadata['setting']}, {len(statements)} statements, "
        f"protocol {vector.metadata['protocol']}, blocks {blocks[0]}-{blocks[-1]}",
        file=out,
    )
    print(f"Question: {args.question}\n", file=out)
    unsteered = api.generate(model, tokenizer, args.question, args.max_new_tokens, protocol=vector)
    print(f"== unsteered ==\n{unsteered}\n", file=out)
    for coefficient in args.coefficients:
        with vector.apply(model, coefficient):  # at the positions of the protocol the vector records
            answer = api.generate(model, tokenizer, args.question, args.max_new_tokens, protocol=vector)
        print(f"== steered, coefficient {coefficient:g} ==\n{answer}\n", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("give a command: steer")
        if not args.question.strip():
            raise UsageError("argument --question: must not be empty")
        run_steer(args)
    except UsageError as error:
        print(f"python -m steer_utils: error: {error} (see --help)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as error:
        print(f"python -m steer_utils: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
