"""The contract every analysis callback keeps, checked once for all of them and both families:
a results.json entry, a definition beside every number it reports, a report section, and
figures that open."""

from __future__ import annotations

import fnmatch
import json
import math
import re

import pytest

DYCK_CALLBACKS = ("function_match", "universality", "sae_transfer", "haar", "steering",
                  "checkpoint_drift", "map_family", "convergence", "sparsity", "spliced_loss",
                  "shared_dictionaries")
LM_CALLBACKS = DYCK_CALLBACKS

# Keys that index results (which pair, site, step, seed ...) rather than measure anything.
STRUCTURAL = {
    "seed", "seeds", "pair", "step", "steps", "site", "sites", "anchor", "alpha", "alphas",
    "reference_alpha", "random_seed", "d", "d_in", "d_sae", "is_best", "sign", "level",
    "n_boot", "margin", "clean_range", "best_step", "hist_counts", "hist_edges", "common_steps",
    "max_steps", "n_sequences", "n_samples", "group", "rotated", "chance_trials", "min_configs",
}
DATA_KEY = re.compile(r"^(\d+(,\d+)*|seed=\d+.*|blocks\..*|[\w.]+/.*|.*hook_.*)$")


def numeric_leaves(obj, key=None, out=None):
    """Names of every numeric value (or list of numbers) in a results entry."""
    out = set() if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("definitions", "figures", "config"):
                continue
            numeric_leaves(v, k, out)
    elif isinstance(obj, list):
        if obj and all(isinstance(x, (int, float)) or x is None for x in obj) and key:
            out.add(key)
        else:
            for v in obj:
                numeric_leaves(v, key, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and key is not None:
        out.add(key)
    return out


def _parts(definition_key: str) -> list[str]:
    return [p.strip() for p in re.split(r" / |, ", definition_key) if p.strip()]


def is_defined(key: str, definitions: dict) -> bool:
    if key in STRUCTURAL or key.startswith("n_") or DATA_KEY.match(key) and "/" not in key:
        return True
    names = {key, key.split("/")[-1]}
    names |= {re.sub(r"_ci$", "", n) for n in names}
    names |= {re.sub(r"^(mean|min|max|pooled)_", "", n) for n in names}
    flat = []
    for d, v in definitions.items():
        flat += _parts(d)
        if isinstance(v, dict):
            flat += [p for k in v for p in _parts(str(k))]
    for part in flat:
        pattern = re.sub(r"<[^>]+>", "*", part.split(".")[-1])
        for name in names:
            if name == part or fnmatch.fnmatch(name, pattern) or name.endswith("_" + part) \
                    or name.startswith(part + "_") or fnmatch.fnmatch(name, "*" + pattern):
                return True
    return False


def _check(results, out_dir, name):
    assert name in results, f"{name} missing from results.json"
    entry = results[name]
    json.dumps(entry, allow_nan=False)  # finite or null, as the file holds it
    definitions = entry.get("definitions")
    assert isinstance(definitions, dict) and definitions, f"{name} has no definitions"
    undefined = sorted(k for k in numeric_leaves(entry) if not is_defined(k, definitions))
    assert not undefined, f"{name}: numbers without a definition: {undefined}"
    report = (out_dir / "report.md").read_text()
    assert f"(`{name}`)" in report, f"{name} has no report section"
    for rel in entry.get("figures", []):
        from PIL import Image

        with Image.open(out_dir / rel) as im:  # a PNG that opens, with real content
            im.verify()
        assert f"figures/{rel.split('/')[-1]}" in report


@pytest.mark.parametrize("name", DYCK_CALLBACKS)
def test_dyck_callback_contract(smoke_analysis, name):
    results, out_dir = smoke_analysis
    _check(results, out_dir, name)


@pytest.mark.parametrize("name", LM_CALLBACKS)
def test_pretrained_callback_contract(lm_analysis, name):
    results, out_dir = lm_analysis
    _check(results, out_dir, name)


def test_the_run_is_self_describing(smoke_analysis):
    _results, out_dir = smoke_analysis
    meta = json.loads((out_dir / "results.json").read_text())["meta"]
    assert meta["config"]["seed"] == 0 and meta["versions"]["torch"]
    assert meta["context"]["seeds"] == [0, 1] and meta["context"]["family"] == "dyck"
    assert all(math.isfinite(t) for t in meta["timings_seconds"].values())
