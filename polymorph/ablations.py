"""Which ablation a job belongs to: the keys in which its config differs from its preset.

Researchers work in three moves: the plain preset over seeds, then ablations by override
(``io=shared``, ``sae.expansion=32``, ``model.d_model=128``, ``analysis.group=SO``), then a
comparison across them. Each ablation gets its own folder without a hand-picked ``name=``:

* the job's config is compared, after resolution, with the same preset composed with no
  overrides (``experiment=<preset>`` alone);
* the keys that differ are named as a readable, sorted ``key=value`` chain: a whole config
  group that changed is named by its option (``io=shared``, ``sae=topk``), other keys by their
  dotted path; a value that only follows an interpolation is named by the key it follows
  (``training.max_steps=2``, not also the schedule's ``total_steps``); long or unusual values
  are shortened and hashed, so two different values never give one name;
* the differences come in three levels, each folder nested in the previous one:

  - **run** keys change the trained (or recorded) model: the family's
    :meth:`~polymorph.families.base.ModelFamily.identity` (Dyck: model, data, training, io,
    family; pretrained: the model id, revision and tokenizer). They name the run folder
    ``outputs/<experiment>/<run keys>/seed=<N>/``. The SAE training activations
    (``activations.*``, ``corpus.*``) count here too: SAE folders are named by SAE config
    alone, so SAEs of other activations need runs of their own;
  - **SAE** keys change only the SAEs (``sae.*``, ``sae_ladder``, ``sites``): SAEs already live
    in ``saes/<site>/<config id>/`` inside the run folder, so an SAE-only ablation trains no new
    transformer;
  - **analysis** keys change only the analysis (``analysis.*`` but its output folder, batch
    size and switched-off callbacks).

  An ablation's own folder, ``outputs/<experiment>/<run keys>/<SAE and analysis keys>/``,
  holds its ``analysis/``;
* seeds never enter a name; keys that change neither the model nor its SAEs nor the analysis
  (logger, launcher, trainer, stage, retrain flags, paths) never do either;
* a ``name=`` that differs from the preset's own name wins: everything of that job goes into
  ``outputs/<name>/`` with no key chain (the saved-config guard in
  :func:`polymorph.runs.check_matches_saved` stays the last line of defence there).

``python train.py -m seed=0..8 io=shared`` hence trains into ``outputs/default/io=shared/``,
``python train.py -m seed=0..8 sae.expansion=32`` adds x32 SAEs beside the x8 ones in
``outputs/default/seed=N/saes/``, and ``python analyze.py sae.expansion=32`` writes
``outputs/default/sae.expansion=32/analysis/``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from polymorph.errors import PolymorphError

#: the repository's config folder (entry points compose from it)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: sections that change only the SAEs of a run
SAE_SECTIONS = ("sae", "sae_ladder", "sites")
#: sections that change the activations SAEs are trained on without changing the model; SAE
#: folders are named by SAE config alone, so these count as run keys (a new run folder)
ACTIVATION_SECTIONS = ("activations", "corpus")
#: activation keys that change only how fast they are collected
ACTIVATION_THROUGHPUT = ("activations.batch_size", "corpus.shuffle_buffer")
#: analysis keys that change where or how fast results are written, not what they are
ANALYSIS_PRESENTATION = ("analysis.output_dir", "analysis.batch_size")
#: config groups whose option names an ablation better than its keys do
NAMED_GROUPS = ("io", "model", "sae", "sae_ladder")
#: keys inside a family's identity that change no finished artefact: what the terminal shows
#: (a progress bar) and when a diverging run gives up (a run that finished never diverged)
PRESENTATION_KEYS = ("training.callbacks.progress", "training.callbacks.divergence",
                     "training.collapse_drop", "training.collapse_evals")
#: longest value written as is into a folder name
MAX_VALUE_CHARS = 24
#: longest key chain written as is as one folder name
MAX_FOLDER_CHARS = 160
MISSING = "<missing>"
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Ablation:
    """Where a job belongs: its experiment and the keys in which it differs from its preset.

    Attributes:
        experiment: the experiment folder name (``cfg.name``).
        preset: the preset compared against (None when ``name=`` was given: no keys then).
        run: key -> value of the differences in what is trained (name the run folder).
        sae: the same for what only changes the SAEs.
        analysis: the same for what only changes the analysis.
    """

    experiment: str
    preset: str | None
    run: dict[str, str] = field(default_factory=dict)
    sae: dict[str, str] = field(default_factory=dict)
    analysis: dict[str, str] = field(default_factory=dict)

    @property
    def run_label(self) -> str:
        return chain(self.run)

    @property
    def sub_label(self) -> str:
        """The SAE and analysis keys (the ablation's folder inside its run folder)."""
        return chain({**self.sae, **self.analysis})

    @property
    def keys(self) -> dict[str, str]:
        return dict(sorted({**self.run, **self.sae, **self.analysis}.items()))

    @property
    def label(self) -> str:
        """Every key, one chain; ``""`` for the plain preset."""
        return chain(self.keys)

    @property
    def display(self) -> str:
        """How reports name it: the chain, or ``<preset> preset`` for the plain preset."""
        return self.label or (f"{self.preset} preset" if self.preset else self.experiment)

    def runs_dir(self, output_root: Path) -> Path:
        """The folder holding this ablation's ``seed=<N>/`` run folders."""
        folder = Path(output_root) / self.experiment
        return folder / folder_name(self.run_label) if self.run_label else folder

    def folder(self, output_root: Path) -> Path:
        """This ablation's own folder (its ``analysis/`` lives there)."""
        folder = self.runs_dir(output_root)
        return folder / folder_name(self.sub_label) if self.sub_label else folder

    def tracking_fields(self) -> dict[str, Any]:
        """Flat fields W&B groups and filters on (config fields and tags)."""
        return {"experiment": self.experiment, "ablation": self.display,
                "ablation_run": self.run_label or "preset",
                **{f"ablation/{k}": v for k, v in self.keys.items()}}

    def tags(self) -> list[str]:
        return [f"experiment={self.experiment}"] + [f"{k}={v}"[:64] for k, v in self.keys.items()]


def folder_name(label: str) -> str:
    """A key chain as one folder name: itself, or (past :data:`MAX_FOLDER_CHARS`, file systems
    allow 255 bytes) its start and a hash of the whole chain."""
    if len(label.encode()) <= MAX_FOLDER_CHARS:
        return label
    digest = hashlib.sha1(label.encode()).hexdigest()[:10]
    return f"{label.encode()[:MAX_FOLDER_CHARS - 12].decode(errors='ignore')}~{digest}"


def chain(keys: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" if not k.startswith("~") else k for k, v in sorted(keys.items()))


def folder_value(value: Any) -> str:
    """``value`` as it appears in a folder name: itself when short and plain, else a readable
    prefix and a hash of the whole (so two values never share a name)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (list, tuple)) and all(not isinstance(v, (list, dict)) for v in value):
        text = "-".join(folder_value(v) for v in value) or "empty"
    elif isinstance(value, (list, tuple, dict)):
        text = repr(value)
    else:
        text = str(value)
    safe = _SAFE.sub("_", text).strip("_.") or "_"
    if safe == text and len(text) <= MAX_VALUE_CHARS:
        return text
    digest = hashlib.sha1(repr(value).encode()).hexdigest()[:6]
    return f"{safe[:MAX_VALUE_CHARS - 8]}~{digest}"


# -- composing the preset --------------------------------------------------------------------


def preset_choice(cfg: DictConfig) -> str | None:
    """The experiment preset of a job: Hydra's choice when running under Hydra, else the preset
    whose own ``name`` is ``cfg.name`` (a config composed in a test or notebook)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("experiment")
        if choice:
            return str(choice)
    except ValueError:
        pass
    return _preset_names().get(str(cfg.get("name")))


@lru_cache(maxsize=1)
def _preset_names() -> dict[str, str]:
    out = {}
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        try:
            name = OmegaConf.select(OmegaConf.load(path), "name")
        except Exception:  # noqa: BLE001 - a preset without a resolvable name names nothing
            name = None
        if isinstance(name, str) and name not in out:
            out[name] = path.stem
    return out


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``config_name`` with ``overrides`` from the repository's config folder: through
    the running Hydra app when there is one, else from :data:`CONF_DIR`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@lru_cache(maxsize=8)
def _preset_config(config_name: str, preset: str) -> DictConfig:
    return compose_config(config_name, [f"experiment={preset}"])


def preset_config(config_name: str, preset: str) -> DictConfig:
    """The preset alone (``experiment=<preset>``, nothing else), composed from
    ``config_name`` (train, or analyze for analyses)."""
    return _preset_config(config_name, preset).copy()


# -- differences -----------------------------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``dotted.key -> value`` (lists are values)."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _container(cfg: DictConfig, key: str, resolve: bool) -> Any:
    node = cfg.get(key) if isinstance(cfg, DictConfig) else None
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=resolve)
    return node


def _section_leaves(cfg: DictConfig, sections, resolve: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in sections:
        if section not in cfg:
            continue
        value = _container(cfg, section, resolve)
        out.update(flatten(value, f"{section}.") if isinstance(value, dict) and value
                   else {section: value})
    return out


def differing(job: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Leaves of ``job`` that differ from ``base`` (MISSING where ``job`` dropped one)."""
    out = {}
    for key in sorted(set(job) | set(base)):
        a, b = job.get(key, MISSING), base.get(key, MISSING)
        if a != b:
            out[key] = a
    return out


def _follow_interpolations(diff: dict[str, Any], raw: dict[str, Any], cfg: DictConfig,
                           base: DictConfig) -> dict[str, Any]:
    """Name a value that only follows an interpolation by the key it follows."""
    out: dict[str, Any] = {}
    for key, value in diff.items():
        out.update(_followed(key, value, raw, cfg, base, depth=0))
    return out


def _followed(key: str, value: Any, raw: dict[str, Any], cfg: DictConfig, base: DictConfig,
              depth: int) -> dict[str, Any]:
    """The keys a moved ``key`` follows, through chains of interpolations (``a: ${b}``,
    ``b: ${c}``: a moved ``c`` names ``a`` and ``b`` by ``c``)."""
    text = raw.get(key)
    refs = _INTERPOLATION.findall(text) if isinstance(text, str) else []
    moved = {ref: v for ref in refs if _select(base, ref) != (v := _select(cfg, ref))}
    if not moved or depth > 8:  # the interpolation itself was overridden: name the key
        return {key: value}
    out: dict[str, Any] = {}
    for ref, v in moved.items():
        out.update(_followed(ref, v, raw, cfg, base, depth + 1))
    return out


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=MISSING)
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return value


@lru_cache(maxsize=64)
def _group_options(group: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """Every option of a config group and its leaves (files packaged under the group only)."""
    options = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        if "@package" in path.read_text().split("\n", 1)[0]:
            continue
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        leaves = flatten(data, f"{group}.") if isinstance(data, dict) and data else {group: data}
        options.append((path.stem, tuple((k, repr(v)) for k, v in leaves.items())))
    return tuple(options)


def _name_groups(diff: dict[str, Any], base: dict[str, Any]) -> dict[str, str]:
    """The differences as display names: a group option where one explains some of them."""
    rest = dict(diff)
    named: dict[str, str] = {}
    for group in NAMED_GROUPS:
        mine = {k: v for k, v in rest.items() if k == group or k.startswith(f"{group}.")}
        options = dict(_group_options(group))
        if not mine or not options:
            continue
        # the option the preset itself chose: the one agreeing with most of its keys
        def agreement(leaves):
            return sum(repr(base.get(k, MISSING)) == v for k, v in leaves)

        best_fit = max(options.values(), key=agreement)
        chosen = dict(best_fit) if agreement(best_fit) else {}  # {}: the preset chose none
        best, explained = None, set()
        for option, leaves in options.items():
            hits = {k for k, v in leaves if k in mine and repr(mine[k]) == v}
            # choosing this option changes its keys that differ from the preset's option: the
            # job has each of them either as the option has it or overridden again
            own = {k for k, v in leaves if chosen.get(k) != v}
            plausible = all(k in mine for k in own)
            if own and plausible and len(hits) > len(explained):
                best, explained = option, hits
        if best is not None:
            named[group] = best
            # keys only the preset's option has are gone because the option changed
            theirs = dict(options[best])
            explained |= {k for k in chosen if k not in theirs and mine.get(k) == MISSING}
            for key in explained:
                rest.pop(key, None)
    dropped = [k for k, v in rest.items() if v == MISSING]
    for prefix in _dropped_subtrees(dropped, base):
        named[f"~{prefix}"] = ""
    for key, value in rest.items():
        if value != MISSING:
            named[key] = folder_value(value)
    return named


def _dropped_subtrees(dropped: list[str], base: dict[str, Any]) -> list[str]:
    """The shortest prefixes whose every key was dropped (``~analysis.callbacks.steering``
    rather than each of its keys)."""
    gone, out = set(dropped), []
    for key in sorted(dropped):
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            prefix = ".".join(parts[:n])
            under = [k for k in base if k == prefix or k.startswith(prefix + ".")]
            if under and all(k in gone for k in under):
                if prefix not in out:
                    out.append(prefix)
                break
    return out


def _diff_names(cfg: DictConfig, base: DictConfig, job_leaves: dict[str, Any],
                base_leaves: dict[str, Any], sections) -> dict[str, str]:
    diff = differing(job_leaves, base_leaves)
    if not diff:
        return {}
    raw = _section_leaves(cfg, sections, resolve=False)
    followed = _follow_interpolations(diff, raw, cfg, base)
    base_all = {**base_leaves, **{k: _select(base, k) for k in followed if k not in base_leaves}}
    return _name_groups(followed, base_all)


def _identity_leaves(identity: dict[str, Any]) -> dict[str, Any]:
    ident = {k: v for k, v in identity.items() if k != "seed"}
    return {k: v for k, v in flatten(ident).items()
            if not any(k == p or k.startswith(p + ".") for p in PRESENTATION_KEYS)}


def derive(cfg: DictConfig, family, preset: str | None = None,
           for_analysis: bool = False) -> Ablation:
    """The ablation of a job's config (see the module docstring).

    ``family`` is the job's :class:`~polymorph.families.base.ModelFamily` (its ``identity``
    says which keys define a run); ``preset`` the experiment preset to compare against (found from the running
    Hydra app or ``cfg.name`` when None); ``for_analysis``: ``cfg`` is an analysis config
    (analyze.yaml), whose analysis keys count too.
    """
    experiment = str(cfg.name)
    preset = preset or preset_choice(cfg)
    if preset is None:
        return Ablation(experiment, None)
    try:
        base = preset_config("analyze" if for_analysis else "train", preset)
    except Exception as err:
        raise PolymorphError(f"cannot compose experiment={preset} to compare this job "
                             f"against ({type(err).__name__}: {err})") from err
    if str(base.get("name")) != experiment:
        return Ablation(experiment, None)  # name= given: it wins
    run_sections = sorted({k.split(".", 1)[0] for k in flatten(family.identity(cfg))
                           if k != "seed"} | {"family"})
    run = _diff_names(cfg, base, _identity_leaves(family.identity(cfg)),
                      _identity_leaves(_identity_of(family, base)), run_sections)
    if "family._target_" in run:  # another family than the preset's: name it by its name
        run.pop("family._target_")
        run["family"] = family.name
    sae = _diff_names(cfg, base, _section_leaves(cfg, SAE_SECTIONS),
                      _section_leaves(base, SAE_SECTIONS), SAE_SECTIONS)
    analysis: dict[str, str] = {}
    if for_analysis:
        on = _callbacks_on(cfg)
        analysis = _diff_names(cfg, base, _analysis_leaves(cfg, on), _analysis_leaves(base, on),
                               ("analysis",))
    # SAE folders are named by SAE config alone: activations of another batch would put their
    # SAEs where the preset's are, so a change of them counts as a change of the run
    job_acts = _section_leaves(cfg, ACTIVATION_SECTIONS)
    base_acts = _section_leaves(base, ACTIVATION_SECTIONS)
    keep = {k: v for k, v in job_acts.items() if k not in ACTIVATION_THROUGHPUT}
    run.update(_diff_names(cfg, base, keep, {k: v for k, v in base_acts.items()
                                             if k not in ACTIVATION_THROUGHPUT},
                           ACTIVATION_SECTIONS))
    return Ablation(experiment, preset, run, sae, analysis)


def _identity_of(family, base: DictConfig) -> dict[str, Any]:
    try:
        return family.identity(base)
    except Exception:  # noqa: BLE001 - a preset of another family: compare what it has
        return {}


def _analysis_leaves(cfg: DictConfig, callbacks: set[str]) -> dict[str, Any]:
    """The analysis keys that change its results, for the ``callbacks`` the job runs (a
    switched-off callback changes no other callback's numbers)."""
    out = {}
    for key, value in _section_leaves(cfg, ("analysis",)).items():
        if key in ANALYSIS_PRESENTATION:
            continue
        if key.startswith("analysis.callbacks.") and key.split(".")[2] not in callbacks:
            continue
        out[key] = value
    return out


def _callbacks_on(cfg: DictConfig) -> set[str]:
    nodes = OmegaConf.select(cfg, "analysis.callbacks") or {}
    return {str(k) for k, v in nodes.items() if v is not None}
