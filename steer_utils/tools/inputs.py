"""What a notebook reads from other notebooks' results, and the check make runs before it (`check-inputs`)."""

from __future__ import annotations

from .. import paths
from ..core.protocol import output_variant, resolve_protocol

# What a notebook reads from other notebooks' results, per model (the writer of each: `paths.producer`). Numbered
# files sit in the protocol's folder (results/<model>/<variant>/), notebook 00's at the top.
NOTEBOOK_INPUTS = {
    "04_multi_model_scaling": (
        "data_summary.csv",
        "01_steerability.csv",
        "01_generations.csv",
        "01_fits.csv",
        "01_paired_tests.csv",
    ),  # notebooks 02, 03 and 05: compared for the models they ran for, the others named
    "05_baselines": ("03_steerability.csv",),
}


def missing_inputs(notebook: str, models: list[str], variant: str = "", make_options: str = "") -> list[str]:
    """One line per results file `notebook` needs (NOTEBOOK_INPUTS) that is missing, naming the make command to run
    (with `make_options`, e.g. 'PROTOCOL=paper')."""
    lines = []
    for model in models:
        for name in NOTEBOOK_INPUTS.get(notebook, ()):
            path = paths.RESULTS_DIR / paths.model_slug(model) / (variant if name[:2].isdigit() else "") / name
            if not path.is_file():
                command = " ".join(filter(None, ("make", paths.producer(name), f"MODELS={model}", make_options)))
                lines.append(f"{notebook} needs {path}; run `{command}` first.")
    return lines


def main(argv: list[str] | None = None) -> int:
    """For make: python -m steer_utils.tools.inputs check-inputs NOTEBOOK --models M... [--protocol P]."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m steer_utils.tools.inputs")
    parser.add_argument("command", choices=["check-inputs"])
    parser.add_argument("notebook")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument(
        "--protocol", default=None, help="a PROTOCOL of make: its runs read results/<model>/protocol-<name>/"
    )
    args = parser.parse_args(argv)
    variant = ""
    if args.protocol:  # the adopted protocol's folder is results/<model>/ itself
        variant = output_variant(resolve_protocol(args.protocol))
    missing = missing_inputs(args.notebook, args.models, variant, f"PROTOCOL={args.protocol}" if args.protocol else "")
    for line in missing:
        print(line, file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
