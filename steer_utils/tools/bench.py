"""`make bench`: how fast each stage runs, on this machine, for one or more models.

Prints a table and writes `results/bench.csv` (tidy: section, model, quantity, value, unit, note) and
`figures/bench.{png,pdf}`. Not a test: numbers depend on the machine and on what else runs on it.

Measured in one run:
- matmul peaks (fp32, bf16) of this CPU/GPU;
- extraction throughput of the reference-style loop (`extract_reference`: batch 1, two full passes with
  `output_attentions` / `output_hidden_states`) vs ours (`extract`), on the same prompts, and our GFLOP/s
  (FLOPs counted by torch's FlopCounterMode on the same call);
- per-stage cost per concept (extract, fit all blocks, enrichment test, generate the grid, judge) and how
  extraction and fitting grow with statements and blocks (least-squares slope, log-log exponent);
- generation: tokens/s over one concept's grid, ours vs one `model.generate` call (and whether the responses
  are identical), and where our time goes (prefill, decoding's LM head, linears, attention core, the rest);
- RFM fit time of one block vs number of examples, and the example cap's cost and effect on one real training set
  (time, held-out correlation, cosine to the uncapped vector); peak RSS of a default-profile concept in a fresh process;
- wall time of each notebook of the last `make all` (read from runs/<model>/*.ipynb) and a projection of
  notebook 01 on the `full` profile (492 concepts: all but the development split; all statements, five questions);
- bf16 against fp32 (speed of extraction and generation; identical responses, equal judge scores and the
  steerability difference on a concept sample), where the CPU has native bf16 or on a GPU; skipped otherwise;
- the judges (`bench_judges`, alone with `--only-judge`): responses/s of the embedding judge and of the LLM judge
  (batch 1 and 8, instruction prefix shared or not, fp32 and bf16: native, or with its linear layers summed in fp32
  where the CPU lacks bf16 instructions, `models.BF16Linear`) on stored responses, the share
  of stored responses its gate lets through, and the projected LLM-judge time of re-judging every stored response;
  then bf16 against fp32 on the hand-labelled cases (native bf16), or, without native bf16, both precisions' P(yes)
  against the bf16 P(yes) a native-bf16 CPU committed (`bench_judge_against_native`).

Every model is loaded in fp32 on CPU (`dtype="auto"`), bf16 only in the bf16 section.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..cache import cache_dir, write_csv
from ..core import decoding, models, prompting, training, vectors
from ..core.extraction import extract, extract_reference, find_blocks
from ..core.protocol import ADOPTED, default_blocks
from ..core.resources import registered_hooks
from ..experiments import data, evaluation, judge, layers, pipeline, plots
from ..experiments.judge_validation import stored_generations
from ..experiments.llm_judge import JUDGE_DTYPE, JUDGE_MODEL, MEMO_KEYS, Calibration, gate_mask
from ..experiments.profiles import PROFILES
from ..paths import FIGURES_DIR, JUDGE_CALIBRATION_FILE, RESULTS_DIR, ROOT, model_slug

SETTINGS = (training.PRIOR, training.HARD, training.OURS)  # notebook 01's grid
PROJECTED_PROFILES = ("default", "compact")  # notebook 01 is projected at these, with the LLM judge
CONCEPT = ("moods", "cheerful")


def _seconds(fn, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype, size: int, device: str = "cpu", repeats: int = 3) -> float:
    """GFLOP/s of a size^3 matmul in `dtype` (best of `repeats`)."""
    a = torch.randn(size, size, device=device).to(dtype)
    a @ a  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = _seconds(lambda: (a @ a, sync()), repeats)
    return 2 * size**3 / seconds / 1e9


def linear_fit(x, y) -> tuple[float, float, float]:
    """(slope, intercept, log-log exponent) of y against x; exponent ~1 means linear growth."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(x, y, 1)
    exponent = np.polyfit(np.log(x), np.log(y), 1)[0]
    return float(slope), float(intercept), float(exponent)


class Table:
    """Rows of the tidy benchmark table."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, section: str, model: str, quantity: str, value: float, unit: str, note: str = "") -> None:
        """Append one measurement."""
        self.rows.append(
            dict(section=section, model=model, quantity=quantity, value=float(value), unit=unit, note=note)
        )

    def frame(self) -> pd.DataFrame:
        """The table as a DataFrame."""
        return pd.DataFrame(self.rows)


def bench_extraction(table: Table, name: str, model, tokenizer, n_statements: int) -> None:
    """Reference-style loop vs ours on one concept's paired prompts, and our achieved GFLOP/s."""
    prefixed, plain = prompting.paired_prompts(tokenizer, *CONCEPT, data.load_statements(n=n_statements))
    prompts = prefixed + plain
    n_tail, pad = len(prompting.shared_tail(prompts)), tokenizer.pad_token_id

    def ours_sets():
        return [extract(model, p, n_tail, pad, keep_user_attention=p is prefixed) for p in (prefixed, plain)]

    ours_sets()  # warm-up
    t_ref = _seconds(lambda: extract_reference(model, prompts, n_tail))
    t_ours = _seconds(ours_sets, repeats=3)
    t_prefixed = _seconds(lambda: extract(model, prefixed, n_tail, pad, keep_user_attention=True), repeats=3)
    with FlopCounterMode(display=False) as counter:
        ours_sets()
    flops = counter.get_total_flops()
    note = f"{len(prompts)} prompts of '{CONCEPT[1]}' ({n_statements} statements, prefixed + unprefixed)"
    table.add("extraction", name, "reference loop", len(prompts) / t_ref, "prompts/s", note)
    table.add("extraction", name, "ours, same prompts", len(prompts) / t_ours, "prompts/s", note)
    table.add("extraction", name, "speed-up, same prompts", t_ref / t_ours, "x", note)
    table.add(
        "extraction",
        name,
        "speed-up per concept in a run",
        t_ref / t_prefixed,
        "x",
        "reference does the concept's prefixed + unprefixed prompts; ours only the prefixed ones "
        "(unprefixed activations are cached once per model and statement set)",
    )
    table.add("extraction", name, "achieved", flops / t_ours / 1e9, "GFLOP/s", "FlopCounterMode FLOPs / wall time")


def bench_stages(table: Table, name: str, model, tokenizer, counts: tuple[int, ...], grader) -> dict[str, float]:
    """Per-concept cost of each stage under the adopted protocol (`protocol.ADOPTED`: the concept's prefixed prompts
    and its contrast concepts' ones) and its growth with statements and blocks; returns the measured costs."""
    statements = data.load_statements(n=max(counts))
    questions = data.load_questions()[CONCEPT[0]][:5]
    n_blocks = len(find_blocks(model))
    extract_s, own_s, fit_s, test_s, examples = [], [], [], [], []
    contrast = pipeline.contrast_concepts(*CONCEPT, ADOPTED)
    for n in counts:
        seconds: dict[str, float] = {}  # extraction seconds by the call's progress label

        def timed(model, prompts, *args, desc: str = "extract", **options):
            start = time.perf_counter()
            acts = extract(model, prompts, *args, desc=desc, **options)
            seconds[desc] = seconds.get(desc, 0.0) + time.perf_counter() - start
            return acts

        acts = training.concept_activations(
            model, tokenizer, *CONCEPT, statements[:n], ADOPTED, contrast, extractor=timed
        )
        own = seconds[f"extract {CONCEPT[1]}"]  # the concept's prefixed prompts; the unprefixed ones: once per model
        own_s.append(own)
        extract_s.append(own + sum(seconds[f"extract {other}"] for other in contrast))
        examples.append(n * (2 + len(contrast)))
        fit_s.append(_seconds(lambda: pipeline.fit_setting(acts, training.Setting.parse("attention-soft-rfm"), name)))
        test_s.append(_seconds(lambda: layers.concept_enrichment(acts)))
    for n, full, own in zip(counts, extract_s, own_s):
        table.add(
            "contrast sharing",
            name,
            "extraction time saved",
            100 * (1 - own / full),
            "%",
            f"{n} statements: a concept's prefixed prompts alone ({own:.1f} s) against them and its "
            f"{len(contrast)} contrast concepts' ({full:.1f} s), which a run shares once those concepts are extracted",
        )
    for stage, seconds in (
        ("extract (prefixed + contrast prompts)", extract_s),
        ("fit one setting, all blocks", fit_s),
        ("enrichment test", test_s),
    ):
        for n, m, s in zip(counts, examples, seconds):
            table.add(
                "stage vs statements",
                name,
                stage,
                s,
                "s/concept",
                f"{n} statements ({m} examples, protocol {ADOPTED.name})",
            )
        slope, intercept, exponent = linear_fit(counts, seconds)
        table.add(
            "growth",
            name,
            f"{stage}: slope",
            slope,
            "s per statement",
            f"intercept {intercept:.2f} s; log-log exponent {exponent:.2f} (1 = linear)",
        )
    features, y, _, _ = training.training_set(acts, training.Setting.parse("attention-soft-rfm"))
    block_counts = sorted({max(1, n_blocks // 4), max(1, n_blocks // 2), n_blocks})
    block_s = [_seconds(lambda: vectors.fit_rfm(features[:, :b], y[:, :b])) for b in block_counts]
    for b, s in zip(block_counts, block_s):
        table.add("stage vs blocks", name, "fit one setting", s, "s/concept", f"{b} blocks, {max(counts)} statements")
    slope, intercept, exponent = linear_fit(block_counts, block_s)
    table.add(
        "growth",
        name,
        "fit one setting: slope",
        slope,
        "s per block",
        f"intercept {intercept:.2f} s; log-log exponent {exponent:.2f} (1 = linear)",
    )
    bench_rfm_cap(table, name, features, y)

    arms = {s: pipeline.fit_setting(acts, training.Setting.parse(s), name)[0] for s in SETTINGS}
    messages, responses, generate_s = bench_generation(
        table, name, model, tokenizer, arms, questions, default_blocks(n_blocks)
    )
    judge_s = _seconds(lambda: grader.score_table(CONCEPT[0], [CONCEPT[1]] * len(messages), messages, responses))
    grid = f"{len(SETTINGS)} settings x {len(pipeline.COEFFICIENTS)} eps x {len(questions)} questions"
    note = f"{len(messages)} rows = {grid}, 50 tokens"
    table.add("stage", name, "generate grid", generate_s, "s/concept", note)
    table.add("stage", name, "judge grid", judge_s, "s/concept", note)
    return {
        "counts": counts,
        "examples": examples,
        "extract": own_s,  # per concept in a run, where its contrast concepts' activations are shared
        "fit": fit_s,
        "generate": generate_s,
        "judge": judge_s,
    }


def bench_rfm_cap(table: Table, name: str, features: torch.Tensor, y: torch.Tensor) -> None:
    """The RFM example cap (`vectors.RFM_MAX_EXAMPLES`) on one concept's real training set: fit time and held-out
    correlation with and without it, and the cosine between the two vectors, mean over blocks."""
    cap = vectors.RFM_MAX_EXAMPLES
    if len(features) <= cap:
        return
    fits = {}
    for label, max_examples in (("uncapped", None), (f"capped at {cap}", cap)):
        seconds = _seconds(lambda: fits.__setitem__(label, vectors.fit_rfm(features, y, max_examples=max_examples)))
        v, details = fits[label]
        note = f"{len(features)} examples, attention-soft-rfm, all blocks"
        table.add("rfm cap", name, f"fit, {label}", seconds, "s", note)
        table.add(
            "rfm cap",
            name,
            f"held-out correlation, {label}",
            float(np.mean([d["val_corr"] for d in details])),
            "",
            note + ", mean over blocks (each fit's own held-out split)",
        )
    cosine = torch.nn.functional.cosine_similarity(fits["uncapped"][0], fits[f"capped at {cap}"][0], dim=-1).abs()
    table.add(
        "rfm cap",
        name,
        "|cosine| capped vs uncapped",
        float(cosine.mean()),
        "",
        f"mean over blocks (min {float(cosine.min()):.3f})",
    )


@contextmanager
def timed_parts(model) -> Iterator[dict[str, float]]:
    """While active, seconds spent in the model's parts, summed over calls (forward hooks, so slightly slower):
    `prefill` / `decode` (whole forward passes of several tokens / one token per row), and within decoding
    `lm head`, `block linears` (every other nn.Linear: projections and MLP) and `attention core` (the attention
    modules minus their linears: rotary embedding, KV cache, scaled dot product)."""
    head = model.get_output_embeddings()
    seconds = dict.fromkeys(("prefill", "decode", "lm head", "block linears", "attention core"), 0.0)
    started: dict[int, float] = {}
    state = {"decoding": False}

    def timed(key, module, inside_attention: bool = False):
        def pre(mod, args, kwargs):
            if key == "forward":
                ids = kwargs.get("input_ids", args[0] if args else None)
                state["decoding"] = ids is not None and ids.shape[1] == 1
            started[id(mod)] = time.perf_counter()

        def post(mod, args, kwargs, output):
            elapsed = time.perf_counter() - started.pop(id(mod))
            if key == "forward":
                seconds["decode" if state["decoding"] else "prefill"] += elapsed
            elif state["decoding"]:
                seconds[key] += elapsed
                if inside_attention:  # the attention module's own time excludes its linears
                    seconds["attention core"] -= elapsed

        return module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(
            post, with_kwargs=True
        )

    attention = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    inside = {id(m) for a in attention for m in a.modules() if isinstance(m, torch.nn.Linear)}
    with registered_hooks() as handles:
        handles += [*timed("forward", model), *timed("lm head", head)]
        for a in attention:
            handles += timed("attention core", a)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                handles += timed("block linears", m, inside_attention=id(m) in inside)
        yield seconds


def bench_generation(
    table: Table,
    name: str,
    model,
    tokenizer,
    arms: dict,
    questions: list[str],
    blocks: list[int],
    max_new_tokens: int = 50,
) -> tuple[list[str], list[str], float]:
    """Generated tokens per second over one concept's grid (`pipeline.grid_rows`): ours (`decoding.generate`) vs
    one `model.generate` call (`decoding.generate_reference`), whether the responses are identical, and where our
    time goes.
    Returns the grid's (messages, our responses, our seconds)."""
    rows, additions = pipeline.grid_rows(arms, pipeline.COEFFICIENTS, len(questions), blocks)
    messages = [questions[q] for _, _, q in rows]
    note = (
        f"{len(rows)} rows = {len(arms)} settings x {len(pipeline.COEFFICIENTS)} eps x {len(questions)} questions, "
        f"up to {max_new_tokens} tokens"
    )
    timings = {}
    for key, generate in (("reference", decoding.generate_reference), ("ours", decoding.generate)):
        start = time.perf_counter()
        timings[key] = (generate(model, tokenizer, messages, additions, max_new_tokens), time.perf_counter() - start)
    (reference, ref_s), (ours, ours_s) = timings["reference"], timings["ours"]
    tokens = sum(len(tokenizer(r, add_special_tokens=False).input_ids) for r in reference)  # ~ tokens generated
    table.add("generation", name, "reference (model.generate)", tokens / ref_s, "tokens/s", note)
    table.add("generation", name, "ours (decoding.generate)", tokens / ours_s, "tokens/s", note)
    table.add("generation", name, "speed-up", ref_s / ours_s, "x", note)
    table.add(
        "generation", name, "identical responses", 100 * np.mean([a == b for a, b in zip(reference, ours)]), "%", note
    )
    start = time.perf_counter()
    full = decoding.generate(model, tokenizer, messages, additions, max_new_tokens, stop_loops=False)
    full_s = time.perf_counter() - start
    table.add("loop stopping", name, "generation time saved", 100 * (1 - ours_s / full_s), "%", note)
    table.add(
        "loop stopping", name, "responses changed", 100 * np.mean([a != b for a, b in zip(full, ours)]), "%", note
    )
    with FlopCounterMode(display=False) as counter:
        decoding.generate(model, tokenizer, messages, additions, max_new_tokens)
    table.add(
        "generation",
        name,
        "achieved, ours",
        counter.get_total_flops() / ours_s / 1e9,
        "GFLOP/s",
        "FlopCounterMode FLOPs / wall time",
    )
    with timed_parts(model) as parts:
        start = time.perf_counter()
        decoding.generate(model, tokenizer, messages, additions, max_new_tokens)
        total = time.perf_counter() - start
    parts["other (norms, MLP activation, hooks, Python)"] = parts["decode"] - sum(
        parts[k] for k in ("lm head", "block linears", "attention core")
    )
    parts["outside the forward passes"] = total - parts["prefill"] - parts["decode"]
    for part, seconds in parts.items():
        within = (
            "" if part in ("prefill", "decode", "outside the forward passes") else "; decoding parts are within decode"
        )
        table.add(
            "generation breakdown",
            name,
            part,
            100 * seconds / total,
            "% of time",
            f"{seconds:.2f} of {total:.2f} s (timed by forward hooks, a little slower){within}",
        )
    return messages, ours, ours_s


def bench_bf16(
    table: Table,
    name: str,
    grader,
    device: str,
    concepts_per_class: int = 1,
    n_statements: int = 64,
    max_new_tokens: int = 50,
) -> None:
    """bf16 vs fp32 on this machine: extraction and generation speed, and how far bf16 changes the results.

    Agreement is measured on a seeded concept sample (`concepts_per_class` per class, attention-soft-rfm, the
    default grid and all questions): the share of identical responses and of equal judge scores, and the
    steerability difference bf16 - fp32 with a paired bootstrap CI over concepts. On a CPU without native bf16
    the section is one row saying so (bf16's linear layers are summed in fp32 there: its speed says nothing of bf16's).
    """
    if device == "cpu" and not models.cpu_has_fast_bf16():
        table.add(
            "bf16",
            name,
            "skipped",
            0,
            "",
            "this CPU has no native bf16 (no avx512_bf16 / amx_bf16), so bf16's linear layers are summed in "
            "fp32 here; run make bench on an AMX / AVX512-BF16 CPU or a GPU to measure bf16",
        )
        return
    sample = data.sample_concepts(concepts_per_class, seed=0)
    statements, questions = data.load_statements(n=n_statements), data.load_questions()
    setting = [training.Setting.parse("attention-soft-rfm")]
    seconds, scored = {}, {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer, _ = models.load_model(name, dtype=dtype, device=device)
        prefixed, plain = prompting.paired_prompts(tokenizer, *CONCEPT, statements)
        n_tail, pad = len(prompting.shared_tail(prefixed + plain)), tokenizer.pad_token_id
        extract(model, prefixed[:2], n_tail, pad)  # warm-up
        seconds[dtype, "extract"] = _seconds(lambda: extract(model, prefixed, n_tail, pad, keep_user_attention=True))
        n_blocks = len(find_blocks(model))
        unit = torch.nn.functional.normalize(torch.ones(model.config.get_text_config().hidden_size), dim=0)
        vector = vectors.ConceptVector(dict.fromkeys(range(n_blocks), unit), dict.fromkeys(range(n_blocks), 1.0))
        grid_questions = questions[CONCEPT[0]]
        seconds[dtype, "generate"] = _seconds(
            lambda: pipeline.generate_grid(
                model,
                tokenizer,
                {"v": vector},
                grid_questions,
                pipeline.COEFFICIENTS,
                default_blocks(n_blocks),
                max_new_tokens,
            )
        )
        context = pipeline.RunContext(model, tokenizer, name, statements, questions, max_new_tokens)
        generations, _ = pipeline.run_concepts(context, sample, setting)
        scored[dtype] = judge.score_generations(grader, generations)
        model = context = None  # frees the weights before the next precision loads
    for stage, what in (
        ("extract", f"{len(prefixed)} prefixed prompts"),
        ("generate", f"{len(pipeline.COEFFICIENTS) * len(grid_questions)} rows x {max_new_tokens} tokens"),
    ):
        for dtype in ("float32", "bfloat16"):
            table.add("bf16", name, f"{stage}, {dtype}", seconds[dtype, stage], "s", what)
        table.add(
            "bf16",
            name,
            f"{stage}: speed-up of bf16",
            seconds["float32", stage] / seconds["bfloat16", stage],
            "x",
            what,
        )
    keys = ["concept_class", "concept", "setting", "coefficient", "question_id"]
    both = scored["float32"].merge(scored["bfloat16"], on=keys, suffixes=("_fp32", "_bf16"))
    note = f"{len(sample)} concepts, {len(both)} responses, attention-soft-rfm, {n_statements} statements"
    table.add("bf16", name, "identical responses", 100 * (both.response_fp32 == both.response_bf16).mean(), "%", note)
    table.add("bf16", name, "equal judge scores", 100 * (both.score_fp32 == both.score_bf16).mean(), "%", note)
    per_concept = {d: evaluation.concept_steerability(s) for d, s in scored.items()}
    aligned = per_concept["float32"].merge(
        per_concept["bfloat16"], on=["concept_class", "concept"], suffixes=("_fp32", "_bf16")
    )
    paired = evaluation.paired_bootstrap(aligned.steerability_fp32, aligned.steerability_bf16)
    table.add("bf16", name, "steerability fp32", paired["mean_a"], "", note + ", best-of-grid")
    table.add("bf16", name, "steerability bf16", paired["mean_b"], "", note + ", best-of-grid")
    table.add(
        "bf16",
        name,
        "steerability bf16 - fp32",
        paired["diff"],
        "",
        f"95% CI [{paired['ci_low']:.3f}, {paired['ci_high']:.3f}], paired bootstrap over concepts, "
        f"p {paired['p_value']:.2f}",
    )


def power_law(x, y, at: float) -> float:
    """y extrapolated to `at` with the log-log least-squares fit y = a x^b (exact for linear or quadratic growth)."""
    b, log_a = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(np.exp(log_a) * at**b)


def bench_rfm(table: Table, name: str, d: int, sizes: tuple[int, ...]) -> None:
    """RFM fit time of one block (bandwidth grid included) vs number of training examples."""
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for n in sizes:
        X = torch.randn(n, 1, d, generator=generator)
        y = (X[:, :, 0] > 0).float()
        seconds.append(_seconds(lambda: vectors.fit_rfm(X, y, max_examples=None), repeats=2))
        table.add("rfm vs examples", name, "fit one block", seconds[-1], "s", f"{n} examples, d={d}")
    _, _, exponent = linear_fit(sizes, seconds)
    table.add(
        "growth", name, "fit one block vs examples: log-log exponent", exponent, "", f"{sizes[0]}-{sizes[-1]} examples"
    )


_RSS_SCRIPT = """
import resource, sys
from steer_utils.core import models, training
from steer_utils.experiments import data, pipeline, profiles
name, settings = sys.argv[1], sys.argv[2:]
p = profiles.resolve_profile("default")
model, tokenizer, _ = models.load_model(name)
questions = {c: q[:p.n_questions] for c, q in data.load_questions().items()}
context = pipeline.RunContext(model, tokenizer, name, data.load_statements(n=p.n_statements), questions,
                              p.max_new_tokens)
pipeline.run_concept(context, "moods", "cheerful", [training.Setting.parse(s) for s in settings])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(name: str) -> float:
    """Peak RSS (GiB) of a fresh process that runs one `default`-profile concept end to end (3 settings)."""
    with tempfile.TemporaryDirectory() as tmp:  # a cold cache, except the converted weights (linked, not rebuilt)
        if (cache_dir() / "models").exists():
            os.symlink((cache_dir() / "models").resolve(), Path(tmp) / "models")
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, name, *SETTINGS],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={**os.environ, "STEER_CACHE_DIR": tmp},
        )
    return int(out.stdout.strip().splitlines()[-1]) / 2**20  # ru_maxrss is in KiB on Linux


def notebook_times(table: Table, name: str) -> dict[str, float]:
    """Wall time of each executed notebook in runs/<model>/ (papermill's record of the last `make all`)."""
    times = {}
    for path in sorted((ROOT / "runs" / model_slug(name)).glob("[0-9][0-9]_*.ipynb")):
        if "-protocol-" in path.stem:
            continue  # a run off the adopted protocol (make PROTOCOL=...), not part of `make all`
        meta = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
        if meta.get("duration") is not None:
            times[path.stem] = meta["duration"] / 60
            profile = meta.get("parameters", {}).get("profile", "?")
            table.add(
                "make all",
                name,
                path.stem,
                times[path.stem],
                "min",
                f"profile {profile}, {meta.get('end_time', '')[:10]}",
            )
    if times:
        table.add("make all", name, "total", sum(times.values()), "min", "sum of the notebooks above")
    return times


def bench_loop_stopping(table: Table, name: str, tokenizer, grader=None, max_new_tokens: int = 50) -> None:
    """What stopping looping rows (`decoding.fill_loop`) changes in notebook 01's committed responses, where they
    were decoded in full (no generation): the share of rows that loop before the token limit, how many decoding
    row-steps stopping them saves, how often the cycle fill is exactly the text the model generated and (with a
    `grader`) how often its judge score is the same."""
    path = RESULTS_DIR / model_slug(name) / "01_generations.csv"
    if not path.is_file():
        return
    rows = pd.read_csv(path, keep_default_na=False)
    looped, exact, saved, changed = 0, 0, 0, []
    for row in rows.itertuples():
        ids = tokenizer(row.response, add_special_tokens=False).input_ids[:max_new_tokens]
        start = decoding.loop_start(ids) if len(ids) == max_new_tokens else None  # rows that ended stop anyway
        if start is None:
            continue
        filled = decoding.fill_loop(ids, max_new_tokens)
        looped, saved = looped + 1, saved + max_new_tokens - start[0]
        exact += filled == ids
        if filled != ids and grader is not None:
            changed.append(row._replace(response=tokenizer.decode(filled)))
    note = (
        f"{len(rows)} responses of results/{model_slug(name)}/01_generations.csv, re-tokenised; a loop: "
        "3 repeats of a cycle of <= 16 tokens"
    )
    table.add("loop stopping", name, "rows that loop", 100 * looped / len(rows), "%", note)
    table.add(
        "loop stopping",
        name,
        "row-steps saved",
        100 * saved / (max_new_tokens * len(rows)),
        "%",
        note + f"; of {max_new_tokens} steps per row",
    )
    table.add("loop stopping", name, "cycle fill = generated text", 100 * exact / max(looped, 1), "%", note)
    if grader is not None and looped:
        changed = pd.DataFrame(changed)
        same = (
            sum(
                int(
                    (
                        grader.score_table(
                            cls, part.concept.tolist(), part.question.tolist(), part.response.tolist()
                        ).score.to_numpy()
                        == part.score.to_numpy()
                    ).sum()
                )
                for cls, part in changed.groupby("concept_class")
            )
            if len(changed)
            else 0
        )
        table.add(
            "loop stopping",
            name,
            "equal judge scores",
            100 * (exact + same) / looped,
            "%",
            note + "; of the looping rows, the filled text scored by the judge",
        )


def bench_judges(table: Table, n: int = 32, seed: int = 0) -> tuple[float, float]:
    """Responses/s of both judges on `n` stored responses of one class (seeded), and what re-judging all would cost;
    returns (the share of stored responses the LLM judge's gate passes, its fastest seconds per response)."""
    stored = stored_generations()
    sample = stored[stored.concept_class == CONCEPT[0]].sample(n, random_state=seed)
    rows = (CONCEPT[0], sample.concept.tolist(), sample.question.tolist(), sample.response.tolist())
    embedding = judge.load_judge("embedding")
    emb_s = _seconds(lambda: embedding.score_table(*rows), repeats=2)
    table.add("judge", "embedding", "throughput", n / emb_s, "responses/s", f"{n} stored responses, {CONCEPT[0]}")
    gated = float(gate_mask(judge.score_generations(embedding, stored.sample(2000, random_state=seed))).mean())
    table.add("judge", JUDGE_MODEL, "gate passes", 100 * gated, "%", "of 2000 stored responses (coherent, answers)")
    # bf16 is timed on every CPU: the notebooks judge in bf16 whatever the CPU (so verdicts do not depend on it);
    # without AVX512-BF16 or AMX its linear layers are summed in fp32 (`models.BF16Linear`).
    bf16_kind = "native" if models.cpu_has_fast_bf16() else "linear layers in fp32"
    per_response = {}
    for dtype in ("float32", "bfloat16"):
        grader = judge.load_judge("llm", dtype=dtype, calibration=Calibration())
        grader.p_yes(*rows[:1], *[r[:2] for r in rows[1:]])  # warm-up, and the class's prefix
        verdicts = {}
        for batch, shared, last_only in ((8, True, True), (8, True, False), (8, False, True), (1, True, True)):
            grader.batch_size, grader.last_logits_only = batch, last_only
            seconds = _seconds(lambda: verdicts.setdefault(last_only, grader.p_yes(*rows, share_prefix=shared)))
            per_response[(dtype, batch, shared, last_only)] = seconds / n
            note = (
                f"{dtype if dtype == 'float32' else f'bfloat16 ({bf16_kind})'}, batch {batch},"
                f" prefix {'shared' if shared else 'recomputed'}, LM head at "
                f"{'the last token only' if last_only else 'every position'}; {n} responses"
            )
            table.add("judge", JUDGE_MODEL, "throughput", n / seconds, "responses/s", note)
        change = float(np.abs(verdicts[True] - verdicts[False]).max())
        table.add("judge", JUDGE_MODEL, "last-token LM head max |P(yes) change|", change, "", f"{dtype}; {n} responses")
    best = min(seconds for (dtype, *_), seconds in per_response.items() if dtype == JUDGE_DTYPE)
    llm_seconds = gated * best  # the LLM's cost per response once gated: only the gate's share reaches it
    # What a notebook pays per response: the LLM's gated cost plus the embedding judge, which sees every response.
    table.add(
        "judge",
        JUDGE_MODEL,
        "throughput, gated",
        1 / (llm_seconds + emb_s / n),
        "responses/s",
        f"every response: the embedding judge, then the LLM on the {100 * gated:.0f}% its gate passes at the fastest "
        f"{JUDGE_DTYPE} setting (issue target: 5)",
    )
    hours = len(stored) * llm_seconds / 3600
    note = f"{len(stored)} unique stored responses, gated, the fastest {JUDGE_DTYPE} setting (the notebooks' judge)"
    table.add("judge", JUDGE_MODEL, "re-judge stored", hours, "h", note)
    return gated, best


def bench_judge_bf16(table: Table) -> None:
    """bf16 against fp32 for the LLM judge on every hand-labelled case, both under the committed verdict rule (the
    calibration chosen in bf16): equal verdicts, the largest P(yes) difference, and each precision's kappa on the
    generated rounds' test halves (native bf16; without it, `bench_judge_against_native`)."""
    if not models.cpu_has_fast_bf16():
        bench_judge_against_native(table)
        return
    cases = judge.load_cases()
    rule = Calibration.load(JUDGE_CALIBRATION_FILE)  # else fp32 falls back to P(yes) > 0.5, a different rule
    scored = {
        dtype: judge.judge_cases(judge.load_judge("llm", dtype=dtype, calibration=rule), cases)
        for dtype in ("float32", "bfloat16")
    }
    fp32, bf16 = scored["float32"], scored["bfloat16"]
    note = f"{len(cases)} hand-labelled cases"
    table.add("judge", JUDGE_MODEL, "bf16 equal verdicts", 100 * (fp32.score == bf16.score).mean(), "%", note)
    table.add("judge", JUDGE_MODEL, "bf16 max |P(yes) change|", (fp32.p_yes - bf16.p_yes).abs().max(), "", note)
    test = (cases.split == "test") & (cases.source == "generated")
    for dtype, frame in scored.items():
        kappa = judge.agreement(frame.label[test], frame.score[test])["kappa"]
        table.add("judge", JUDGE_MODEL, f"test-half kappa, {dtype}", kappa, "", "generated rounds' test halves")


NATIVE_P_YES = RESULTS_DIR / "qwen2.5-coder-0.5b" / "01_generations.csv"  # judged in bf16 on a native-bf16 CPU


def bench_judge_against_native(
    table: Table, per_class: int = 16, seed: int = 0, committed: Path = NATIVE_P_YES, rule: Calibration | None = None
) -> None:
    """On a CPU without bf16 instructions: the judge's P(yes) here, in bf16 (its linear layers summed in fp32,
    `models.BF16Linear`) and in fp32, against the bf16 P(yes) a native-bf16 CPU committed for the same responses
    (`per_class` gated responses per class, seeded): speed, largest and mean |difference|, equal verdicts under
    the committed rule."""
    versions = committed.parent / "versions.csv"
    if not (committed.is_file() and versions.is_file() and "(native bf16)" in versions.read_text()):
        return  # nothing judged on a native-bf16 CPU to compare with
    rule = rule or Calibration.load(JUDGE_CALIBRATION_FILE)
    stored = pd.read_csv(committed, keep_default_na=False, na_values=[""])  # a response "NA" stays text
    stored = stored[stored.p_yes.notna()].drop_duplicates(MEMO_KEYS)
    classes = [
        part
        for _, part in stored.groupby("concept_class")
        .sample(per_class, random_state=seed)
        .groupby("concept_class", sort=False)
    ]
    sample = pd.concat(classes)
    for dtype, label in (("bfloat16", "bf16, linear layers summed in fp32"), ("float32", "fp32")):
        grader = judge.load_judge("llm", dtype=dtype, calibration=rule)
        grader.memo = None  # computed here, never read from the P(yes) memo
        start = time.perf_counter()
        p_yes = np.concatenate(
            [grader.p_yes(c.concept_class.iloc[0], c.concept, c.question, c.response) for c in classes]
        )
        seconds = time.perf_counter() - start
        change = np.abs(p_yes - sample.p_yes.to_numpy(float))
        equal = rule.verdict(sample.assign(p_yes=p_yes)) == rule.verdict(sample)
        note = f"{label}; {len(sample)} responses of {committed.parent.name}/{committed.name}, judged on a native CPU"
        table.add("judge", JUDGE_MODEL, "vs native bf16: throughput", len(sample) / seconds, "responses/s", note)
        table.add("judge", JUDGE_MODEL, "vs native bf16: max |P(yes) change|", change.max(), "", note)
        table.add("judge", JUDGE_MODEL, "vs native bf16: mean |P(yes) change|", change.mean(), "", note)
        table.add("judge", JUDGE_MODEL, "vs native bf16: equal verdicts", 100 * equal.mean(), "%", note)


def project_full(table: Table, name: str, costs: dict[str, float]) -> None:
    """Notebook 01 on the `full` profile: every concept but the development split, all statements, 3 settings, 5
    questions, under the adopted protocol. A fit above the RFM's example cap costs what the measured capped fit did."""
    n_concepts, n_statements = len(data.sample_concepts(None)), len(data.load_statements())
    extract_s = power_law(costs["counts"], costs["extract"], n_statements)
    capped = costs["examples"][-1] >= vectors.RFM_MAX_EXAMPLES
    fit_s = len(SETTINGS) * (costs["fit"][-1] if capped else power_law(costs["counts"], costs["fit"], n_statements))
    per_concept = extract_s + fit_s + costs["generate"] + costs["judge"]
    table.add(
        "projection",
        name,
        "01 full profile",
        n_concepts * per_concept / 3600,
        "h",
        f"{n_concepts} concepts x {per_concept:.0f} s ({n_statements} statements: extract {extract_s:.0f} s "
        f"(contrast shared), fit {fit_s:.0f} s, generate {costs['generate']:.0f} s, judge {costs['judge']:.0f} s; "
        f"{'fit: the measured capped fit' if capped else 'power-law fits'}; protocol {ADOPTED.name})",
    )


def project_notebook_01(
    table: Table, name: str, costs: dict[str, float], profile: str, judge_seconds: float, gate_share: float
) -> None:
    """Notebook 01 at a profile with its judge: per concept, extraction and the three settings' fits at the profile's
    statements, its rows generated (the settings' and the random control's grid plus the unsteered answers, at the
    measured grid's cost per row) and the LLM judge on the rows its gate passes (`judge_seconds` per response)."""
    chosen = PROFILES[profile]
    n_concepts, n = len(data.sample_concepts(chosen.n_concepts_per_class)), chosen.n_statements
    extract_s = power_law(costs["counts"], costs["extract"], n)
    capped = n * costs["examples"][0] / costs["counts"][0] >= vectors.RFM_MAX_EXAMPLES
    fit_s = len(SETTINGS) * (costs["fit"][-1] if capped else power_law(costs["counts"], costs["fit"], n))
    grid_rows = len(SETTINGS) * len(pipeline.COEFFICIENTS) * chosen.n_questions  # what `costs` timed
    rows = (len(SETTINGS) + 1) * len(pipeline.COEFFICIENTS) * chosen.n_questions + chosen.n_questions
    generate_s = costs["generate"] * rows / grid_rows
    judge_s = rows * (costs["judge"] / grid_rows + gate_share * judge_seconds)
    per_concept = extract_s + fit_s + generate_s + judge_s
    table.add(
        "projection",
        name,
        f"01 {profile} profile",
        n_concepts * per_concept / 60,
        "min",
        f"{n_concepts} concepts x {per_concept:.0f} s ({n} statements: extract {extract_s:.0f} s, fit {fit_s:.0f} s, "
        f"generate {rows} rows {generate_s:.0f} s, judge {judge_s:.0f} s: LLM judge on the {100 * gate_share:.0f}% "
        f"its gate passes at {judge_seconds:.2f} s each; protocol {ADOPTED.name})",
    )


def run(
    models_: list[str],
    counts: tuple[int, ...],
    reference_statements: int,
    rss: bool,
    bf16_concepts_per_class: int = 1,
    judge_agreement: bool = True,
) -> pd.DataFrame:
    """All measurements for the given models; the first model also gets the RFM and memory sections.
    `judge_agreement=False` skips the judge's bf16-vs-fp32 check on every hand-labelled case (cold: ~45 min)."""
    table = Table()
    device = models.resolve_device("auto")
    table.add("peak", device, "matmul fp32", matmul_peak(torch.float32, 2048, device), "GFLOP/s", "2048^3, best of 3")
    table.add(
        "peak",
        device,
        "matmul bf16",
        matmul_peak(torch.bfloat16, 1024 if device == "cpu" else 4096, device, 1),
        "GFLOP/s",
        "best of 1 (slow without avx512_bf16)" if device == "cpu" else "4096^3",
    )
    grader, costs = None, {}
    for i, name in enumerate(models_):
        model, tokenizer, info = models.load_model(name)
        if i == 0:
            # First, before any generate/judge call: after those, MKL's batched LU failed on these random
            # Gaussian matrices in this process (twice, not reproducible in isolation; real fits never did).
            bench_rfm(table, name, info.hidden_size, (64, 128, 256, 512, 1024))
            grader = judge.load_judge("embedding")
        table.add("model", name, "dtype", 16 if "16" in info.dtype else 32, "bits", f"{info.dtype} on {info.device}")
        bench_extraction(table, name, model, tokenizer, reference_statements)
        bench_loop_stopping(table, name, tokenizer, grader)
        costs[name] = bench_stages(table, name, model, tokenizer, counts, grader)
        project_full(table, name, costs[name])
        if i == 0 and rss:
            table.add("memory", name, "peak RSS, one default-profile concept", peak_rss(name), "GiB", "fresh process")
        notebook_times(table, name)
        del model
        bench_bf16(table, name, grader, device, bf16_concepts_per_class)
    gate_share, judge_seconds = bench_judges(table)
    for name, measured in costs.items():
        for profile in PROJECTED_PROFILES:
            project_notebook_01(table, name, measured, profile, judge_seconds, gate_share)
    if judge_agreement:
        bench_judge_bf16(table)
    frame = table.frame()
    peaks = frame[frame.section == "peak"].set_index("quantity").value
    native_bf16 = device != "cpu" or models.cpu_has_fast_bf16()  # else bf16 is not bf16's own speed here
    for row in frame[frame.quantity.isin(["achieved", "achieved, ours"])].itertuples():
        for dtype in ("fp32", "bf16") if native_bf16 else ("fp32",):
            table.add(
                row.section, row.model, f"achieved / {dtype} peak", 100 * row.value / peaks[f"matmul {dtype}"], "%", ""
            )
    table.add(
        "machine",
        device,
        "threads",
        torch.get_num_threads(),
        "",
        f"{models.cpu_name()}, torch {torch.__version__}, "
        f"{resource.getpagesize()} B pages, {time.strftime('%Y-%m-%d')}",
    )
    return table.frame()


def plot(frame: pd.DataFrame):
    """Five panels: extraction and generation throughput, stage cost vs statements, RFM vs examples, notebook
    wall times."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    plots.set_style()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.4), layout="constrained")
    ext = frame[(frame.section == "extraction") & (frame.unit == "prompts/s")]
    sns.barplot(ext, x="model", y="value", hue="quantity", ax=axes[0])
    axes[0].set(yscale="log", ylabel="prompts / s (log)", xlabel="", title="Extraction throughput")
    axes[0].legend(title=None, fontsize=7)
    stages = frame[frame.section == "stage vs statements"].assign(
        statements=lambda t: t.note.str.split().str[0].astype(int)
    )
    sns.lineplot(stages, x="statements", y="value", hue="quantity", style="model", marker="o", ax=axes[1])
    axes[1].set(ylabel="seconds per concept", title="Cost vs training statements")
    axes[1].legend(title=None, fontsize=7)
    rfm = frame[frame.section == "rfm vs examples"].assign(examples=lambda t: t.note.str.split().str[0].astype(int))
    sns.lineplot(rfm, x="examples", y="value", marker="o", ax=axes[2])
    axes[2].set(
        xscale="log", yscale="log", ylabel="seconds (log)", xlabel="training examples (log)", title="RFM fit, one block"
    )
    nb = frame[(frame.section == "make all") & (frame.quantity != "total")]
    if len(nb):
        sns.barplot(nb, x="model", y="value", hue="quantity", ax=axes[3])
        axes[3].legend(title=None, fontsize=7)
    else:
        axes[3].text(
            0.5,
            0.5,
            "no executed notebooks in runs/\n(run make all, then make bench)",
            ha="center",
            va="center",
            transform=axes[3].transAxes,
        )
        axes[3].set(xticks=[], yticks=[])
    axes[3].set(ylabel="minutes", xlabel="", title="make all (default profile)")
    gen = frame[(frame.section == "generation") & (frame.unit == "tokens/s")]
    sns.barplot(gen, x="model", y="value", hue="quantity", ax=axes[4])
    axes[4].set(ylabel="generated tokens / s", xlabel="", title="Generation, one concept's grid")
    axes[4].legend(title=None, fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m steer_utils.tools.bench [--models ...]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--statements", type=int, nargs="+", default=[16, 32, 64, 128], help="statement counts")
    parser.add_argument("--reference-statements", type=int, default=32, help="statements in the reference comparison")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocess")
    parser.add_argument("--bf16-concepts", type=int, default=1, help="concepts per class in the bf16 agreement check")
    parser.add_argument("--only-judge", action="store_true", help="only the judges -> results/bench_judge.csv")
    parser.add_argument(
        "--no-judge-agreement",
        action="store_true",
        help="skip the judge's bf16-vs-fp32 verdicts on every hand-labelled case (about 45 min without the judge's "
        "memo), e.g. when benching one more model beside a committed run that has them",
    )
    parser.add_argument(
        "--out",
        default="bench",
        help="name of the table and figure (results/NAME.csv, figures/NAME.png), e.g. to "
        "bench one more model without replacing the committed run",
    )
    args = parser.parse_args(argv)
    if args.only_judge:
        table = Table()
        bench_judges(table)
        bench_judge_bf16(table)
        machine = f"{models.cpu_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
        table.add("machine", "cpu", "threads", torch.get_num_threads(), "", machine)
        write_csv(table.frame(), RESULTS_DIR / "bench_judge.csv")
        print(table.frame().to_string(index=False))
        return
    frame = run(
        args.models,
        tuple(args.statements),
        args.reference_statements,
        not args.no_rss,
        args.bf16_concepts,
        not args.no_judge_agreement,
    )
    write_csv(frame, RESULTS_DIR / f"{args.out}.csv")
    plots.save_figure(plot(frame), FIGURES_DIR, args.out)
    with pd.option_context("display.width", 200, "display.max_colwidth", 70, "display.max_rows", 500):
        print(frame.assign(value=frame.value.round(3)).to_string(index=False))


if __name__ == "__main__":
    main()
