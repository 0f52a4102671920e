"""Sharding the concept sample, the shard manifests, and the merge checks (no models)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from steer_utils import paths
from steer_utils.core import prompting
from steer_utils.experiments import data
from steer_utils.tools import shards

MODEL, NB = "org/tiny-model", "01_token_selection"
PARAMS = {"model": MODEL, "profile": "smoke", "seed": 0, "shard_index": 1, "num_shards": 3}


def fake_sample(n: int) -> pd.DataFrame:
    """n concepts in class blocks, like `sample_concepts` (stratified, class by class)."""
    classes = [prompting.CLASSES[i * len(prompting.CLASSES) // n] for i in range(n)]
    return pd.DataFrame({"concept_class": classes, "concept": [f"c{i}" for i in range(n)], "index": range(n)})


@pytest.mark.parametrize("n, num_shards", [(1, 1), (5, 1), (5, 5), (7, 2), (7, 3), (13, 4), (25, 6), (50, 50)])
def test_shards_cover_every_concept_once(n, num_shards):
    sample = fake_sample(n)
    parts = [data.shard_concepts(sample, i, num_shards) for i in range(num_shards)]
    assert sorted(c for p in parts for c in p.concept) == sorted(sample.concept)
    assert all(len(p) >= 1 and list(p.index) == list(range(len(p))) for p in parts)
    assert all(list(p["index"]) == sorted(p["index"]) for p in parts)  # original order kept
    assert [len(p) for p in parts] == [len(range(i, n, num_shards)) for i in range(num_shards)]


def test_sharding_is_deterministic_and_mixes_classes():
    sample = data.sample_concepts(4, seed=0)
    first = [data.shard_concepts(sample, i, 3) for i in range(3)]
    again = [data.shard_concepts(data.sample_concepts(4, seed=0), i, 3) for i in range(3)]
    assert all(a.equals(b) for a, b in zip(first, again))
    assert all(p.concept_class.nunique() == len(prompting.CLASSES) for p in first)
    whole = data.shard_concepts(sample, 0, 1)
    assert whole.equals(sample) and whole is not sample


@pytest.mark.parametrize(
    "index, num, match",
    [
        (True, 2, "shard_index must be an integer"),
        (0, 2.0, "num_shards must be an integer"),
        ("1", 2, "-p shard_index"),
        (-1, 2, r"in 0\.\.1"),
        (2, 2, r"in 0\.\.1"),
        (0, 0, "at least 1"),
        (0, 11, "use at most 10 shards"),
    ],
)
def test_bad_shard_parameters_are_refused(index, num, match):
    with pytest.raises(ValueError, match=match):
        data.shard_concepts(fake_sample(10), index, num)


def test_output_dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(paths, "FIGURES_DIR", tmp_path / "figures")
    assert paths.results_dir(MODEL) == tmp_path / "results" / "org--tiny-model"
    assert paths.results_dir(MODEL, 0, 1) == paths.results_dir(MODEL)
    assert paths.results_dir(MODEL, 2, 4) == tmp_path / "results" / "org--tiny-model" / "shards" / "2-of-4"
    assert paths.figures_dir(MODEL, 2, 4).is_dir() and paths.shard_name(2, 4) == "2-of-4"


def write_shards(root, num_shards: int = 3, n: int = 10, skip=(), tables: bool = True) -> pd.DataFrame:
    """Manifests (and a generations table) of every shard but `skip`; returns the merged generations."""
    sample, merged = fake_sample(n), []
    for i in range(num_shards):
        shard = data.shard_concepts(sample, i, num_shards)
        gens = pd.DataFrame(
            [
                {
                    "concept_class": k,
                    "concept": c,
                    "setting": s,
                    "question_id": q,
                    "relevance": 0.1 * q + len(c) / 7,
                    "score": q % 2,
                }
                for k, c in zip(shard.concept_class, shard.concept)
                for s in ("a", "b")
                for q in range(2)
            ]
        )
        merged.append(gens)
        if i in skip:
            continue
        out = root / paths.model_slug(MODEL) / "shards" / paths.shard_name(i, num_shards)
        out.mkdir(parents=True)
        assert shards.write_manifest(out, NB, MODEL, i, num_shards, shard, sample, PARAMS) is not None
        if tables:
            gens.to_csv(out / f"{NB[:2]}_generations.csv", index=False)
    return pd.concat(merged, ignore_index=True)


def edit_manifest(root, i, num_shards=3, **changes):
    path = root / paths.model_slug(MODEL) / "shards" / paths.shard_name(i, num_shards) / f"{NB}.shard.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        target = manifest["parameters"] if key == "profile" else manifest
        target[key] = value(manifest) if callable(value) else value
    path.write_text(json.dumps(manifest))


def test_manifest_written_only_when_sharded(tmp_path):
    assert shards.write_manifest(tmp_path, NB, MODEL, 0, 1, fake_sample(3), fake_sample(3), PARAMS) is None
    assert list(tmp_path.iterdir()) == []
    write_shards(tmp_path, tables=False)
    manifests = shards.check_shards(MODEL, NB, 3, results_root=tmp_path)
    assert [m["shard_index"] for m in manifests] == [0, 1, 2]
    assert "shard_index" not in manifests[0]["parameters"] and manifests[0]["parameters"]["profile"] == "smoke"
    assert manifests[1]["concepts"][0] == [prompting.CLASSES[0], "c1"] and len(manifests[2]["sample"]) == 10


def test_missing_shards_are_named_with_the_command(tmp_path):
    write_shards(tmp_path, num_shards=4, skip=(1, 3))
    with pytest.raises(ValueError, match="2 of 4 shards are missing") as err:
        shards.check_shards(MODEL, NB, 4, results_root=tmp_path)
    assert "shards 1, 3" in str(err.value)
    assert f"make {NB} MODELS=org/tiny-model SHARD_INDEX=3 NUM_SHARDS=4 PROFILE=smoke" in str(err.value)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(concepts=lambda m: m["concepts"] + [[prompting.CLASSES[0], "c0"]]),
            r"overlap: 1 concepts.*c0 in shards 0, 1",
        ),
        (dict(concepts=lambda m: m["concepts"][1:]), r"incomplete: 1 of 10 concepts .*c1\).*shard 1\. Rerun make"),
        (dict(profile="full"), r"different parameters:\n  profile: shard 0 'smoke', shard 1 'full'"),
        (dict(sample=lambda m: m["sample"][:-1]), "different concept samples"),
        (dict(shard_index=2), "does not match its folder: shard_index=2"),
    ],
)
def test_inconsistent_shards_are_refused(tmp_path, change, match):
    write_shards(tmp_path)
    edit_manifest(tmp_path, 1, **change)
    with pytest.raises(ValueError, match=match):
        shards.check_shards(MODEL, NB, 3, results_root=tmp_path)


@pytest.mark.parametrize("key", ["profile", "name"])  # `name`: the notebooks pass `Profile.as_dict()`
def test_check_refuses_one_shard_and_another_profile(tmp_path, monkeypatch, key):
    monkeypatch.delitem(PARAMS, "profile")
    monkeypatch.setitem(PARAMS, key, "smoke")
    write_shards(tmp_path)
    with pytest.raises(ValueError, match="num_shards >= 2"):
        shards.check_shards(MODEL, NB, 1, results_root=tmp_path)
    with pytest.raises(ValueError, match="ran with profile 'smoke'.*PROFILE=smoke"):
        shards.check_shards(MODEL, NB, 3, results_root=tmp_path, profile="default")
    assert len(shards.check_shards(MODEL, NB, 3, results_root=tmp_path, profile="smoke")) == 3


def test_verify_merged(tmp_path):
    merged = write_shards(tmp_path)
    out = tmp_path / paths.model_slug(MODEL)
    examples = merged.groupby("concept_class").head(1)[["concept_class", "concept", "setting"]]
    examples.to_csv(out / "01_examples.csv", index=False)  # a selection: checked on shared concepts
    for i in range(3):
        shard = merged[merged.concept.isin(data.shard_concepts(fake_sample(10), i, 3).concept)]
        shard.groupby("concept_class").head(1)[examples.columns].to_csv(
            out / "shards" / f"{i}-of-3" / "01_examples.csv", index=False
        )
    merged.sample(frac=1, random_state=0).to_csv(out / "01_generations.csv", index=False)  # row order ignored
    assert shards.verify_merged(MODEL, NB, 3, results_root=tmp_path) == len(merged) + 5
    merged.assign(relevance=merged.relevance * (1 + 1e-9)).to_csv(out / "01_generations.csv", index=False)
    assert shards.verify_merged(MODEL, NB, 3, results_root=tmp_path) == len(merged) + 5
    merged.loc[5, "score"] = 1 - merged.loc[5, "score"]
    merged.loc[6, "relevance"] += 0.01
    merged.to_csv(out / "01_generations.csv", index=False)
    message = r"01_generations.csv differs from shard 0-of-3.* in 2 of 16 rows.*Rerun it: make .*SHARD_INDEX=0 NUM"
    with pytest.raises(ValueError, match=message):
        shards.verify_merged(MODEL, NB, 3, results_root=tmp_path)
    merged[merged.concept != "c9"].to_csv(out / "01_generations.csv", index=False)
    with pytest.raises(ValueError, match="other parameters than the shards"):
        shards.verify_merged(MODEL, NB, 3, results_root=tmp_path)


def test_cli_reports_a_missing_shard(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path)
    write_shards(tmp_path, skip=(2,))
    assert shards.main(["check", "--model", MODEL, "--notebook", f"{NB}.ipynb", "--num-shards", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot merge") and "SHARD_INDEX=2 NUM_SHARDS=3" in err and "Traceback" not in err
    write_shards(tmp_path / "other")
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path / "other")
    assert shards.main(["check", "--model", MODEL, "--notebook", NB, "--num-shards", "3"]) == 0
    assert "complete and disjoint (10 concepts)" in capsys.readouterr().out


def test_shards_off_the_adopted_protocol_are_read_from_its_results_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path)
    merged = write_shards(tmp_path, skip=(1,))
    variant = tmp_path / paths.model_slug(MODEL) / "protocol-paper"
    variant.mkdir()
    (tmp_path / paths.model_slug(MODEL) / "shards").rename(variant / "shards")
    with pytest.raises(ValueError, match="3 of 3 shards are missing") as err:
        shards.check_shards(MODEL, NB, 3)  # the adopted protocol's folder holds no shard now
    assert "PROTOCOL" not in str(err.value)
    with pytest.raises(ValueError, match=r"1 of 3 shards are missing.*protocol-paper/shards") as err:
        shards.check_shards(MODEL, NB, 3, protocol="paper")
    assert "SHARD_INDEX=1 NUM_SHARDS=3 PROFILE=smoke PROTOCOL=paper" in str(err.value)
    write_shards(tmp_path / "full")
    (tmp_path / "full" / paths.model_slug(MODEL) / "shards").rename(variant / "shards-all")
    (variant / "shards").rename(variant / "shards-partial")
    (variant / "shards-all").rename(variant / "shards")
    merged.to_csv(variant / "01_generations.csv", index=False)
    assert shards.main(["verify", "--model", MODEL, "--notebook", NB, "--num-shards", "3", "--protocol", "paper"]) == 0
