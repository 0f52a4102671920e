"""Split a notebook's concepts over several machines, then merge and check the results.

Workflow, e.g. four shards of notebook 01 (each one a job of a SLURM array, say):

    make 01_token_selection MODELS=smollm2-135m SHARD_INDEX=$i NUM_SHARDS=4   # i = 0..3

A sharded run works on `data.shard_concepts(sample, i, n)` (every n-th concept of the sample),
writes its tables into `results/<model>/shards/<i>-of-<n>/` and a manifest
`<notebook>.shard.json` there (`write_manifest`). Keep the cache (`STEER_CACHE_DIR`) on storage
the jobs share, or copy the shards' caches together afterwards. Then

    make merge NOTEBOOK=01_token_selection NUM_SHARDS=4 MODELS=smollm2-135m

checks that the shards are complete and disjoint (`check_shards`), runs the notebook once
unsharded (every heavy per-concept result is found in the cache, so that run only re-reads,
judges and summarises into `results/<model>/`), and verifies the merged per-concept tables
against the shards' (`verify_merged`). Both checks also run as
`python -m steer_utils.tools.shards check|verify --model M --notebook NB --num-shards N`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths
from ..cache import atomic_write
from ..core.protocol import output_variant, resolve_protocol

SHARD_PARAMETERS = ("shard_index", "num_shards")
RTOL, ATOL = 1e-6, 1e-9  # numbers may differ in the last bits between runs (batched embeddings)


def _notebook_name(notebook: str) -> str:
    return Path(notebook).name.removesuffix(".ipynb")


def _concept_pairs(frame: pd.DataFrame) -> list[list[str]]:
    return [[str(k), str(c)] for k, c in zip(frame.concept_class, frame.concept)]


def write_manifest(
    out_dir: Path,
    notebook: str,
    model: str,
    shard_index: int,
    num_shards: int,
    shard: pd.DataFrame,
    sample: pd.DataFrame,
    parameters: dict,
) -> Path | None:
    """Write `<notebook>.shard.json` (the shard's concepts and parameters) into `out_dir`; None when unsharded."""
    shard_index, num_shards = paths.check_shard(shard_index, num_shards)
    if num_shards == 1:
        return None
    notebook = _notebook_name(notebook)
    params = {k: v for k, v in parameters.items() if k not in SHARD_PARAMETERS}
    manifest = {
        "notebook": notebook,
        "model": model,
        "shard_index": shard_index,
        "num_shards": num_shards,
        "parameters": json.loads(json.dumps(params, default=str)),
        "concepts": _concept_pairs(shard),
        "sample": _concept_pairs(sample),
    }
    path = Path(out_dir) / f"{notebook}.shard.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1), encoding="utf-8"))
    return path


def _variant(protocol: str | None) -> str:
    """The results subfolder of a run under the `steering_protocol` named `protocol` ('' for the adopted one)."""
    if protocol is None:
        return ""
    return output_variant(resolve_protocol(protocol))


def _merged_dir(root: Path, model: str, protocol: str | None) -> Path:
    return Path(root) / paths.model_slug(model) / _variant(protocol)


def _shard_dir(root: Path, model: str, shard_index: int, num_shards: int, protocol: str | None = None) -> Path:
    return _merged_dir(root, model, protocol) / "shards" / paths.shard_name(shard_index, num_shards)


def _make_command(
    notebook: str, model: str, shard_index: int, num_shards: int, profile: str | None, protocol: str | None = None
) -> str:
    extra = f" PROFILE={shlex.quote(str(profile))}" if profile is not None else ""
    extra += f" PROTOCOL={shlex.quote(protocol)}" if protocol is not None else ""
    return f"make {notebook} MODELS={shlex.quote(model)} SHARD_INDEX={shard_index} NUM_SHARDS={num_shards}{extra}"


def _profile_of(manifest: dict) -> str | None:
    """The profile a shard ran with: `profile`, or `name` of a `Profile.as_dict()`."""
    params = manifest["parameters"]
    return params.get("profile", params.get("name"))


def _differing_parameters(manifests: list[dict]) -> list[str]:
    keys = sorted({k for m in manifests for k in m["parameters"]})
    lines = []
    for key in keys:
        values = [m["parameters"].get(key, "<unset>") for m in manifests]
        if any(v != values[0] for v in values):
            lines.append(f"{key}: " + ", ".join(f"shard {i} {v!r}" for i, v in enumerate(values)))
    return lines


def check_shards(
    model: str,
    notebook: str,
    num_shards: int,
    results_root: Path | None = None,
    profile: str | None = None,
    protocol: str | None = None,
) -> list[dict]:
    """The manifests of shards 0..n-1 of `notebook`, or one ValueError saying what is wrong and what to run.

    Refuses missing shards, manifests that disagree with their folder, shards run with different
    parameters (or with a `profile` other than the given one) or samples, overlapping shards and
    shards that together miss concepts of the sample. `protocol`: the `steering_protocol` the shards ran under
    (None: the adopted one), which decides their results folder (`protocol.output_variant`).
    """
    notebook, root = _notebook_name(notebook), Path(results_root or paths.RESULTS_DIR)
    what = f"{notebook} for {model}"
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 2:
        raise ValueError(
            f"Merging {what} needs num_shards >= 2, got {num_shards!r}; pass the NUM_SHARDS the shards were run with."
        )
    manifests: dict[int, dict] = {}
    for i in range(num_shards):
        path = _shard_dir(root, model, i, num_shards, protocol) / f"{notebook}.shard.json"
        if path.is_file():
            try:
                manifests[i] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"Manifest {path} is unreadable ({err}); rerun shard {i}: "
                    f"{_make_command(notebook, model, i, num_shards, profile, protocol)}"
                ) from None
    missing = [i for i in range(num_shards) if i not in manifests]
    if missing:
        known = profile or next((_profile_of(m) for m in manifests.values()), None)
        commands = "\n".join(f"  {_make_command(notebook, model, i, num_shards, known, protocol)}" for i in missing)
        raise ValueError(
            f"Cannot merge {what}: {len(missing)} of {num_shards} shards are missing "
            f"(no {notebook}.shard.json under {_merged_dir(root, model, protocol) / 'shards'}/<i>-of-{num_shards}/): "
            f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}. Run them first:\n{commands}"
        )
    ordered = [manifests[i] for i in range(num_shards)]
    for i, m in enumerate(ordered):
        expected = {"shard_index": i, "num_shards": num_shards, "notebook": notebook, "model": model}
        wrong = [f"{k}={m.get(k)!r} (expected {v!r})" for k, v in expected.items() if m.get(k) != v]
        if wrong:
            raise ValueError(
                f"The manifest of shard {paths.shard_name(i, num_shards)} of {what} does not match "
                f"its folder: {', '.join(wrong)}; it was copied from elsewhere. Rerun the shard: "
                f"{_make_command(notebook, model, i, num_shards, profile, protocol)}"
            )
    differing = _differing_parameters(ordered)
    if differing:
        raise ValueError(
            f"The shards of {what} ran with different parameters:\n  "
            + "\n  ".join(differing)
            + "\nRerun the odd shards with the parameters of the others."
        )
    ran_with = _profile_of(ordered[0])
    if profile is not None and ran_with is not None and ran_with != profile:
        raise ValueError(
            f"The shards of {what} ran with profile {ran_with!r}, but the merge would use "
            f"{profile!r}; run make merge ... PROFILE={ran_with}."
        )
    sample = [tuple(c) for c in ordered[0]["sample"]]
    odd = [i for i, m in enumerate(ordered) if [tuple(c) for c in m["sample"]] != sample]
    if odd:
        raise ValueError(
            f"The shards of {what} split different concept samples (shards {', '.join(map(str, odd))} "
            "differ from shard 0): they ran with different code or sample settings. "
            "Rerun them with the same code and parameters."
        )
    owners: dict[tuple, list[int]] = {}
    for i, m in enumerate(ordered):
        for concept in m["concepts"]:
            owners.setdefault(tuple(concept), []).append(i)
    overlap = {c: s for c, s in owners.items() if len(s) > 1}
    if overlap:
        listed = "; ".join(f"{k}/{c} in shards {', '.join(map(str, s))}" for (k, c), s in list(overlap.items())[:10])
        raise ValueError(
            f"The shards of {what} overlap: {len(overlap)} concepts are in more than one shard "
            f"({listed}). Each concept must be in exactly one shard; rerun the shards with the "
            "same NUM_SHARDS and code."
        )
    in_sample = set(sample)
    strays = [c for c in owners if c not in in_sample]
    if strays:
        raise ValueError(
            f"The shards of {what} hold {len(strays)} concepts that are not in the sample "
            f"(e.g. {strays[0][0]}/{strays[0][1]}); rerun the shards with the same code and parameters."
        )
    lacking = [(pos, c) for pos, c in enumerate(sample) if c not in owners]
    if lacking:
        due = sorted({pos % num_shards for pos, _ in lacking})  # round-robin: position i goes to shard i % n
        listed = ", ".join(f"{k}/{c}" for _, (k, c) in lacking[:10])
        raise ValueError(
            f"The shards of {what} are incomplete: {len(lacking)} of {len(sample)} concepts are in "
            f"no shard ({listed}); they belong to shard{'s' if len(due) > 1 else ''} "
            f"{', '.join(map(str, due))}. Rerun "
            + "; ".join(_make_command(notebook, model, i, num_shards, ran_with, protocol) for i in due)
        )
    return ordered


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _is_numeric(column: pd.Series) -> bool:
    filled = column[column != ""]
    return len(filled) > 0 and pd.to_numeric(filled, errors="coerce").notna().all()


def _differing_rows(a: pd.DataFrame, b: pd.DataFrame) -> int:
    """How many rows of two string tables with the same columns differ, ignoring row order.

    Columns that are numbers in both compare to a relative 1e-6; the others compare as strings.
    """
    numeric = [c for c in a.columns if _is_numeric(a[c]) and _is_numeric(b[c])]
    text = [c for c in a.columns if c not in numeric]

    def ordered(frame: pd.DataFrame) -> pd.DataFrame:
        keys = frame.copy()
        for c in numeric:
            keys[c] = pd.to_numeric(frame[c].replace("", np.nan))
        return keys.sort_values(text + numeric, kind="stable").reset_index(drop=True)

    extra, n = abs(len(a) - len(b)), min(len(a), len(b))
    a, b, differs = ordered(a).iloc[:n], ordered(b).iloc[:n], np.zeros(n, dtype=bool)
    for c in text:
        differs |= (a[c] != b[c]).to_numpy()
    for c in numeric:
        x, y = a[c].to_numpy(dtype=float), b[c].to_numpy(dtype=float)
        differs |= ~np.isclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True)
    return int(differs.sum()) + extra


def _keys(frame: pd.DataFrame) -> pd.Series:
    if "concept_class" in frame:
        return frame.concept_class + "/" + frame.concept
    return frame.concept


def verify_merged(
    model: str, notebook: str, num_shards: int, results_root: Path | None = None, protocol: str | None = None
) -> int:
    """Check the merged per-concept tables in `results/<model>/` against every shard's; the rows verified.

    Tables are the notebook's `<NN>_*.csv` files with a `concept` column found in every shard. A table
    whose concepts are those of the shards together (e.g. `01_generations.csv`) must equal, restricted
    to each shard's concepts, that shard's table; a selection of concepts (e.g. `01_examples.csv`) is
    compared on the concepts it shares with each shard. Raises a ValueError naming what differs.
    """
    notebook, root = _notebook_name(notebook), Path(results_root or paths.RESULTS_DIR)
    profile = _profile_of(check_shards(model, notebook, num_shards, root, protocol=protocol)[0])
    merged_dir = _merged_dir(root, model, protocol)
    dirs = [_shard_dir(root, model, i, num_shards, protocol) for i in range(num_shards)]
    prefix = notebook.split("_")[0] + "_"
    names = sorted(
        p.name
        for p in dirs[0].glob(f"{prefix}*.csv")
        if all((d / p.name).is_file() for d in dirs) and "concept" in pd.read_csv(p, nrows=0).columns
    )
    if not names:
        raise ValueError(
            f"No per-concept tables ({prefix}*.csv with a concept column) are in every shard of "
            f"{notebook} for {model} under {merged_dir / 'shards'}; did every shard run to the end?"
        )
    verified = 0
    for name in names:
        merged_path = merged_dir / name
        if not merged_path.is_file():
            raise ValueError(
                f"{merged_path} is missing: run the notebook unsharded first "
                f"(make merge NOTEBOOK={notebook} NUM_SHARDS={num_shards} does)."
            )
        merged, tables = _read_table(merged_path), [_read_table(d / name) for d in dirs]
        merged_keys = set(_keys(merged))
        union = set().union(*(set(_keys(t)) for t in tables))
        if merged_keys != union and name.endswith("_generations.csv"):
            raise ValueError(
                f"{merged_path} covers {len(merged_keys)} concepts but the shards' {name} together "
                f"cover {len(union)} ({len(merged_keys - union)} only merged, "
                f"{len(union - merged_keys)} only in shards): the merge ran with other parameters "
                "than the shards; rerun make merge with the shards' PROFILE and parameters."
            )
        for i, shard in enumerate(tables):
            rerun = _make_command(notebook, model, i, num_shards, profile, protocol)
            if list(shard.columns) != list(merged.columns):
                raise ValueError(
                    f"{name} of shard {paths.shard_name(i, num_shards)} has columns "
                    f"{list(shard.columns)}, the merged one {list(merged.columns)}: the shard ran "
                    f"with different code; rerun it: {rerun}"
                )
            keys = set(_keys(shard)) if merged_keys == union else set(_keys(shard)) & merged_keys
            mine, theirs = merged[_keys(merged).isin(keys)], shard[_keys(shard).isin(keys)]
            bad = _differing_rows(mine, theirs)
            if bad:
                raise ValueError(
                    f"{merged_path} differs from shard {paths.shard_name(i, num_shards)}'s "
                    f"{dirs[i] / name} in {bad} of {max(len(mine), len(theirs))} rows: the shard ran with "
                    "different code, parameters or cache than the merged run. Rerun it: "
                    f"{rerun}, then make merge again."
                )
            verified += len(mine)
    return verified


def main(argv: list[str] | None = None) -> int:
    """CLI: `check` the shards before a merge, or `verify` the merged tables after it; 1 on a problem."""
    parser = argparse.ArgumentParser(prog="python -m steer_utils.tools.shards", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("check", "verify"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--notebook", required=True, help="e.g. 01_token_selection")
    parser.add_argument("--num-shards", type=int, required=True)
    parser.add_argument("--profile", help="check: the profile the merge run will use (must be the shards')")
    parser.add_argument(
        "--protocol", help="the steering_protocol the shards ran under (make's PROTOCOL); default: the adopted one"
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "check":
            manifests = check_shards(
                args.model, args.notebook, args.num_shards, profile=args.profile, protocol=args.protocol
            )
            print(
                f"{args.num_shards} shards of {_notebook_name(args.notebook)} for {args.model}: complete and "
                f"disjoint ({len(manifests[0]['sample'])} concepts)."
            )
        else:
            rows = verify_merged(args.model, args.notebook, args.num_shards, protocol=args.protocol)
            print(
                f"Merged {_notebook_name(args.notebook)} for {args.model} matches its {args.num_shards} shards "
                f"({rows} rows verified)."
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
