"""Finding the four ladders the ``shared_dictionaries`` callback compares at one site.

* ``own``: each seed's own SAEs (``seed=<N>/saes/<site>/<config id>/``), the configs every
  analysed seed has;
* ``rotated``: the anchor's SAEs of the same configs, read on each other seed through the
  analysis' fitted rotation (rotate-and-transfer);
* ``universal``: the universal SAEs of the cohort trained on exactly the analysed seeds
  (``shared/<site>/universal/<cohort>/<config id>/``), with their consensus maps;
* ``crosscoder``: the crosscoders of the matching cohort.

A ladder is the rungs of one *family*: dictionaries whose configs differ only in their sparsity
setting (L1, k, L0 coefficient, initial threshold), so that L0 moves along it and nothing else
does. Where several families exist, the one with most rungs is compared (or the architecture
the callback is told), and the others are named in the notes.

A cohort is used only if it spans the analysed seeds, was trained from the runs as they are
now (each seed's run fingerprint), and its rows are disjoint from the scored batch; everything
else is reported, with the command that trains what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from polymorph.errors import PolymorphError
from polymorph.sae.shared_io import read_cohort, run_fingerprint
from polymorph.sae.shared_layout import SharedLayout

METHODS = ("own", "rotated", "universal", "crosscoder")
#: the keys that set a dictionary's sparsity: a family is a config with these left out
SPARSITY_KEYS = ("l1_coefficient", "k", "l0_coefficient", "jumprelu_init_threshold")


@dataclass(frozen=True)
class Rung:
    """One dictionary config of a ladder: its id, its sparsity setting, where it lives."""

    config_id: str
    sparsity: str
    config: dict[str, Any]
    folders: dict[int, Path] = field(default_factory=dict)  # per seed (own); {-1: folder} else


@dataclass
class Ladder:
    """The rungs of one family of one method at one site."""

    method: str
    family: str
    rungs: list[Rung]
    cohort: dict[str, Any] | None = None  # the shared cohort's record (universal, crosscoder)
    cohort_dir: Path | None = None

    @property
    def n_rungs(self) -> int:
        return len(self.rungs)


def family_key(config: dict[str, Any]) -> str:
    """The config without its sparsity setting, canonically (equal for rungs of one ladder)."""
    rest = {k: v for k, v in config.items() if k not in SPARSITY_KEYS}
    return json.dumps(rest, sort_keys=True, default=str)


def family_label(config: dict[str, Any]) -> str:
    arch = config.get("architecture")
    return f"{arch} x{config.get('expansion')}, {config.get('steps')} steps"


def sparsity_label(config: dict[str, Any]) -> str:
    parts = [f"{k}={config[k]:g}" if isinstance(config[k], (int, float)) else f"{k}={config[k]}"
             for k in SPARSITY_KEYS if config.get(k) is not None]
    return ", ".join(parts) or "-"


def _group(rungs: list[Rung]) -> dict[str, list[Rung]]:
    out: dict[str, list[Rung]] = {}
    for rung in rungs:
        out.setdefault(family_key(rung.config), []).append(rung)
    return out


def _pick(groups: dict[str, list[Rung]], architecture: str | None,
          prefer: str | None = None) -> str | None:
    """The family compared: ``prefer`` if present, else the one with most rungs (of
    ``architecture`` when given); ties by key, so the choice is reproducible."""
    keys = [k for k in groups if architecture is None
            or groups[k][0].config.get("architecture") == architecture]
    if prefer in keys:
        return prefer
    return max(sorted(keys), key=lambda k: len(groups[k])) if keys else None


# --------------------------------------------------------------------------- own-seed SAEs


def own_rungs(ctx, site: str) -> tuple[list[Rung], list[str]]:
    """The SAE configs every analysed seed has at ``site`` (complete folders), and a note per
    config some seeds lack."""
    per_seed: dict[int, dict[str, Path]] = {}
    for seed in ctx.seeds:
        folder = ctx.runs[seed].saes / site
        found = {}
        if folder.is_dir():
            for p in folder.iterdir():
                if all((p / f).is_file() for f in ("cfg.json", "metrics.json", "polymorph.json")):
                    found[p.name] = p
        per_seed[seed] = found
    common = set.intersection(*(set(v) for v in per_seed.values()))
    union = set().union(*(set(v) for v in per_seed.values()))
    notes = [f"{cid} at {site}: only seeds "
             f"{[s for s in ctx.seeds if cid in per_seed[s]]} have it, so it is not compared"
             for cid in sorted(union - common)]
    rungs = []
    for cid in sorted(common):
        meta = json.loads((per_seed[ctx.anchor][cid] / "polymorph.json").read_text())
        config = meta.get("sae_config") or {}
        rungs.append(Rung(cid, sparsity_label(config), config,
                          {s: per_seed[s][cid] for s in ctx.seeds}))
    return rungs, notes


# --------------------------------------------------------------------------- shared cohorts


def matching_cohort(ctx, site: str, method: str, layout: SharedLayout, scored_spec,
                    scored_name: str) -> tuple[Path | None, dict | None, list[str]]:
    """The cohort of ``method`` at ``site`` trained on exactly the analysed seeds from their
    current runs, with rows disjoint from the scored batch; and why each other one is not used.

    Several matching cohorts (e.g. other fit batches or groups): the one whose consensus group
    is the analysis' group, else the newest.
    """
    reasons, usable = [], []
    fingerprints = {str(s): run_fingerprint(ctx.runs[s]) for s in ctx.seeds}
    for folder in layout.cohorts(site, method):
        try:
            record = read_cohort(folder / "cohort.json")
        except (ValueError, OSError) as err:
            reasons.append(f"{folder}: unreadable ({err})")
            continue
        seeds = [int(s) for s in record.get("seeds", [])]
        if sorted(seeds) != sorted(ctx.seeds):
            reasons.append(f"{method} cohort {folder.name} spans seeds {seeds}, the analysis "
                           f"seeds {sorted(ctx.seeds)}")
            continue
        stale = [s for s, r in record.get("runs", {}).items()
                 if r.get("fingerprint") != fingerprints.get(s)]
        if stale:
            reasons.append(f"{method} cohort {folder.name} was trained from earlier runs of "
                           f"seed(s) {stale} (retrained since)")
            continue
        clash = _overlap(ctx, record, scored_spec, scored_name)
        if clash:
            reasons.append(f"{method} cohort {folder.name}: {clash}")
            continue
        usable.append((folder, record))
    if not usable:
        return None, None, reasons
    usable.sort(key=lambda fr: (fr[1].get("group", ctx.group) == ctx.group,
                                (fr[0] / "cohort.json").stat().st_mtime))
    folder, record = usable[-1]
    reasons += [f"{method} cohort {f.name} also matches; {folder.name} is used"
                for f, _ in usable[:-1]]
    return folder, record, reasons


def _overlap(ctx, record: dict, scored_spec, scored_name: str) -> str | None:
    """Why the cohort's rows (its SAE activations, its fit batch) are not held out from the
    scored batch, or None when they are (the family decides what overlapping means)."""
    if scored_spec is None:
        return None
    specs = {"its SAE-training activations": record.get("activations_spec"),
             "its consensus fit batch": record.get("fit_batch_spec")}
    for name, spec in specs.items():
        if spec is None:
            continue
        try:
            ctx.family.check_batches({name: OmegaConf.create(spec), scored_name: scored_spec})
        except PolymorphError as err:
            return f"not held out from the scored batch: {err}"
    return None


def shared_rungs(layout: SharedLayout, cohort_dir: Path, method: str) -> list[Rung]:
    """Every finished dictionary in one cohort folder, with its config."""
    rungs = []
    for folder in layout.dictionaries(cohort_dir, method):
        if method == "universal":
            config = json.loads((folder / "polymorph.json").read_text()).get("sae_config") or {}
        else:
            config = json.loads((folder / "crosscoder_cfg.json").read_text()).get("config") or {}
        rungs.append(Rung(folder.name, sparsity_label(config), config, {-1: folder}))
    return rungs


# --------------------------------------------------------------------------- the four ladders


def find_ladders(ctx, site: str, layout: SharedLayout, *, scored_spec, scored_name: str,
                 sae_architecture: str | None, crosscoder_architecture: str | None
                 ) -> tuple[dict[str, Ladder], list[str], list[str]]:
    """(ladders by method, what is missing, notes) at ``site``; see the module docstring.

    ``missing`` lists what a trained shared stage should have given but did not (it marks the
    analysis partial); ``notes`` what was found and left aside.
    """
    missing: list[str] = []
    own, notes = own_rungs(ctx, site)
    ladders: dict[str, Ladder] = {}
    cohorts = {}
    for method in ("universal", "crosscoder"):
        folder, record, reasons = matching_cohort(ctx, site, method, layout, scored_spec,
                                                  scored_name)
        cohorts[method] = (folder, record)
        (missing if folder is None else notes).extend(reasons)
    uni_dir, uni_record = cohorts["universal"]
    uni_groups = _group(shared_rungs(layout, uni_dir, "universal")) if uni_dir else {}
    own_groups = _group(own)
    uni_key = _pick(uni_groups, sae_architecture)
    key = _pick(own_groups, sae_architecture, prefer=uni_key) if own_groups else None
    if key is not None:
        rungs = own_groups[key]
        label = family_label(rungs[0].config)
        ladders["own"] = Ladder("own", label, rungs)
        ladders["rotated"] = Ladder("rotated", label, rungs)
        notes += [f"own-seed SAE family {family_label(g[0].config)} ({len(g)} rung(s)) at {site} "
                  "is not the one compared" for k, g in own_groups.items() if k != key]
    if uni_key is not None:
        rungs = uni_groups[uni_key]
        ladders["universal"] = Ladder("universal", family_label(rungs[0].config), rungs,
                                      uni_record, uni_dir)
        if key is not None and uni_key != key:
            notes.append(f"at {site} the universal SAEs ({family_label(rungs[0].config)}) and "
                         "the own-seed SAEs compared are different families: they meet at "
                         "matched L0 only")
    cc_dir, cc_record = cohorts["crosscoder"]
    if cc_dir is not None:
        cc_groups = _group(shared_rungs(layout, cc_dir, "crosscoder"))
        cc_key = _pick(cc_groups, crosscoder_architecture)
        if cc_key is not None:
            rungs = cc_groups[cc_key]
            config = rungs[0].config
            ladders["crosscoder"] = Ladder(
                "crosscoder", f"crosscoder {config.get('architecture')} x"
                f"{config.get('expansion')}, {config.get('steps')} steps", rungs, cc_record,
                cc_dir)
    return ladders, missing, notes
