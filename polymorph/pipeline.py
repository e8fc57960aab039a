"""train(cfg): one seed's job: the Dyck transformer (or a pretrained model), then its
activations and SAEs.

With ``model_source=pretrained`` (the PolyPythias) nothing is trained but the SAEs: the job
resolves the seed's model at its revision, records where it came from, and goes on to the
activations and SAEs exactly as for the toy.

Idempotent and resumable: a finished run (``metrics.json`` present) is never
retrained unless ``retrain=true``; an interrupted one resumes from its last
checkpoint; existing SAE folders are kept unless ``retrain_saes=true``.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from polymorph import __version__
from polymorph.activations import (
    SiteError,
    check_sites,
    collect_activations,
    load_activations,
    save_activations,
)
from polymorph.checkpoints import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_weights,
    read_json,
    read_weights,
)
from polymorph.errors import PolymorphError
from polymorph.layout import RunLayout
from polymorph.locks import file_lock
from polymorph.models.dyck import (
    IO_PARAMETERS,
    count_trainable_parameters,
    freeze_io_parameters,
)
from polymorph.tasks.datamodule import DyckDataModule
from polymorph.token_batches import batch_tokens, is_pretrained, model_source, position_mask
from polymorph.tracking import build_logger, closing_wandb, log_config
from polymorph.training.callbacks import RunCheckpoints, StopAfterConvergence
from polymorph.training.transformer_module import MIN_ACC, DyckTransformerModule

log = logging.getLogger(__name__)

STAGES = ("all", "transformer", "sae")
IO_MODES = ("independent", "shared")
# Config sections that define what a trained transformer is: a saved run and the
# current config must agree on these before a run is resumed or reused.
RUN_IDENTITY_KEYS = ("seed", "model", "data", "training", "io")


def output_root(cfg: DictConfig) -> Path:
    root = Path(str(cfg.paths.root))
    if not root.is_absolute():
        try:
            from hydra.core.hydra_config import HydraConfig

            root = Path(HydraConfig.get().runtime.cwd) / root
        except ValueError:  # not running under @hydra.main (e.g. a test calling train())
            root = Path.cwd() / root
    return root


def build_model(model_cfg: DictConfig, **overrides):
    """``instantiate(cfg.model)``, letting a PolymorphError from the builder (e.g. a model that
    cannot be fetched) reach the user as itself rather than wrapped in Hydra's exception."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(model_cfg, **overrides)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, PolymorphError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def run_layout(cfg: DictConfig, seed: int | None = None) -> RunLayout:
    return RunLayout.for_seed(output_root(cfg), str(cfg.name), int(cfg.seed if seed is None else seed))


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import hydra
    import sae_lens
    import transformer_lens  # noqa: F401

    return {
        "polymorph": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "hydra": hydra.__version__,
        "transformer_lens": version("transformer-lens"),
        "sae_lens": sae_lens.__version__,
    }


def validate_config(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise PolymorphError(f"stage={cfg.stage} is unknown; use one of {', '.join(STAGES)}")
    model_source(cfg)  # raises on an unknown value
    if is_pretrained(cfg) and cfg.io.mode != "independent":
        raise PolymorphError("io=shared trains the toy with the anchor's embeddings; a pretrained "
                             "model has its own: use io=independent with model_source=pretrained")
    if cfg.io.mode not in IO_MODES:
        raise PolymorphError(f"io.mode={cfg.io.mode} is unknown; use io=independent or io=shared")
    for key in ("seed",):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PolymorphError(
                f"{key}={value!r} must be a non-negative integer (sweep with -m {key}=0..8)"
            )


def _identity(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg, resolve=True)
    return {k: data.get(k) for k in RUN_IDENTITY_KEYS}


def _diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return out


def check_matches_saved(cfg: DictConfig, layout: RunLayout) -> None:
    """A run folder may only be resumed or reused by the config that created it."""
    if not layout.config.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(layout.config), resolve=True)
    diffs = _diff({k: saved.get(k) for k in RUN_IDENTITY_KEYS}, _identity(cfg))
    if diffs:
        raise PolymorphError(
            f"{layout.root} was trained with a different config ({'; '.join(diffs[:4])}); "
            f"restore those overrides, choose another name=..., or pass retrain=true to start over"
        )


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train one seed as configured; returns (metrics, objects)."""
    validate_config(cfg)
    layout = run_layout(cfg)
    layout.root.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    objects: dict = {"layout": layout}
    with closing_wandb():
        logger = build_logger(cfg.get("logger"), layout.logs, f"seed={cfg.seed}", "train")
        objects["logger"] = logger
        if cfg.stage in ("all", "transformer"):
            if is_pretrained(cfg):
                metrics.update(ensure_pretrained(cfg, layout, logger))
            else:
                metrics.update(ensure_transformer(cfg, layout, logger))
        if cfg.stage in ("all", "sae"):
            if not layout.is_finished():
                raise PolymorphError(
                    f"stage=sae needs a finished transformer, but {layout.root} has none; train it "
                    f"(or, for a pretrained model, record it) first with: python train.py "
                    f"seed={cfg.seed} name={cfg.name} stage=transformer"
                )
            from polymorph.sae_stage import train_saes_for_run

            metrics.update(train_saes_for_run(cfg, layout, logger))
    return metrics, objects


# -- the transformer ---------------------------------------------------------------


def ensure_transformer(cfg: DictConfig, layout: RunLayout, logger) -> dict:
    """Train (or resume, or reuse) this seed's transformer under the run's lock."""
    with file_lock(layout.lock):
        if cfg.retrain:
            _discard_transformer_run(layout)
        check_matches_saved(cfg, layout)
        if layout.is_finished():
            log.info("seed %s already trained in %s: reusing it (retrain=true to redo)", cfg.seed, layout.root)
            return read_json(layout.final_metrics)
        anchor_io = None
        if cfg.io.mode == "shared" and cfg.seed != cfg.io.anchor_seed:
            anchor_io = anchor_io_weights(cfg)
        return _fit(cfg, layout, logger, anchor_io)


def ensure_pretrained(cfg: DictConfig, layout: RunLayout, logger) -> dict:
    """Resolve (fetch if needed) this seed's pretrained model and record it as a finished run.

    Nothing is trained: the run folder records the model id, revision and Hub commit actually
    loaded, so the SAEs and the analysis can be tied to exact weights.
    """
    with file_lock(layout.lock):
        if cfg.retrain:
            _discard_transformer_run(layout)
        check_matches_saved(cfg, layout)
        if layout.is_finished():
            log.info("seed %s: pretrained model already recorded in %s", cfg.seed, layout.root)
            return read_json(layout.final_metrics)
        start = time.perf_counter()
        model = build_model(cfg.model)
        try:
            check_sites(model, list(cfg.sites))
        except SiteError as err:
            raise PolymorphError(str(err)) from err
        source = model.polymorph_source.to_dict()
        n_params = sum(p.numel() for p in model.parameters())
        atomic_write_text(layout.config, OmegaConf.to_yaml(cfg, resolve=True))
        info = {
            "seed": int(cfg.seed),
            "experiment": str(cfg.name),
            "model_source": "pretrained",
            "model": source,
            "architecture": {k: getattr(model.cfg, k) for k in
                             ("d_model", "n_layers", "n_heads", "d_mlp", "d_vocab", "n_ctx")},
            "total_parameters": n_params,
            "versions": versions(),
            "status": "finished",
        }
        atomic_write_json(layout.run_info, info)
        log_config(logger, cfg, {"model_id": source["model_id"], "revision": source["revision"],
                                 "model_commit": source["commit"]})
        final = {
            "seed": int(cfg.seed),
            "pretrained": True,
            **{f"model_{k}": v for k, v in source.items()},
            "total_parameters": n_params,
            "load_seconds": round(time.perf_counter() - start, 2),
            "definitions": {"pretrained": "no training happened: the model was loaded as published"},
        }
        atomic_write_json(layout.final_metrics, final)  # written last: marks the run finished
        return final


def _discard_transformer_run(layout: RunLayout) -> None:
    for path in (layout.final_metrics, layout.run_info, layout.config):
        path.unlink(missing_ok=True)
    shutil.rmtree(layout.checkpoints, ignore_errors=True)
    shutil.rmtree(layout.activations, ignore_errors=True)
    shutil.rmtree(layout.saes, ignore_errors=True)


def anchor_io_weights(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The anchor's trained embedding and unembedding, training the anchor first if needed.

    The anchor's own lock makes this safe under any launcher order or
    parallelism: whoever gets the lock first trains the anchor, the others
    wait and then reuse it.
    """
    anchor_cfg = cfg.copy()
    OmegaConf.set_struct(anchor_cfg, False)
    anchor_cfg.seed = int(cfg.io.anchor_seed)
    anchor_cfg.retrain = False
    anchor = run_layout(anchor_cfg)
    anchor.root.mkdir(parents=True, exist_ok=True)
    with file_lock(anchor.lock):
        if anchor.config.is_file():
            saved = OmegaConf.load(anchor.config)
            for key in ("model", "io"):
                a = OmegaConf.to_container(saved[key], resolve=True)
                b = OmegaConf.to_container(cfg[key], resolve=True)
                if a != b:
                    raise PolymorphError(
                        f"anchor run {anchor.root} has {key}={a}, this run has {key}={b}: shared I/O "
                        f"needs identical configs; train the anchor with the same overrides or use "
                        f"another name=..."
                    )
        if not anchor.is_finished():
            log.info("io=shared: training anchor seed %s first in %s", anchor_cfg.seed, anchor.root)
            check_matches_saved(anchor_cfg, anchor)
            _fit(anchor_cfg, anchor, False, None)
    state, _ = read_weights(anchor.best)
    return {name: state[name] for name in IO_PARAMETERS}


def _fit(cfg: DictConfig, layout: RunLayout, logger, anchor_io: dict | None) -> dict:
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model = build_model(cfg.model)
    if anchor_io is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in anchor_io.items():
                params[name].copy_(value)
        freeze_io_parameters(model)
    n_trainable = count_trainable_parameters(model)
    t = cfg.training
    module = DyckTransformerModule(
        model,
        lr=t.lr,
        betas=tuple(t.betas),
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        total_steps=t.max_steps,
        final_lr_fraction=t.final_lr_fraction,
        length_buckets=t.length_buckets,
    )
    datamodule = DyckDataModule(seed=int(cfg.seed), **OmegaConf.to_container(cfg.data, resolve=True))
    convergence = StopAfterConvergence(t.converge_threshold, t.converge_patience)
    checkpoints = RunCheckpoints(layout, t.eval_every)
    trainer = instantiate(
        cfg.trainer,
        callbacks=[convergence, checkpoints],
        logger=logger,
        default_root_dir=str(layout.logs),
    )
    resume = layout.resume_state if layout.resume_state.is_file() else None
    if resume is None:
        atomic_write_text(layout.config, OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "seed": int(cfg.seed),
        "experiment": str(cfg.name),
        "io": OmegaConf.to_container(cfg.io, resolve=True),
        "trainable_parameters": n_trainable,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "versions": versions(),
        "status": "training",
        "resumed_from_step": None,
    }
    if resume is not None:
        info["resumed_from_step"] = _check_resume_state(resume)
    atomic_write_json(layout.run_info, info)
    log_config(logger, cfg, {"trainable_parameters": n_trainable})
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise PolymorphError(f"training of {layout.root} was interrupted; rerun to resume")
    if not layout.best.is_file():
        raise PolymorphError(
            f"{layout.root}: training ended before the first validation (max_steps="
            f"{t.max_steps} < eval_every={t.eval_every}); raise training.max_steps"
        )
    final = {
        "seed": int(cfg.seed),
        "steps": int(trainer.global_step),
        "best_step": checkpoints.best_step,
        "best/" + MIN_ACC: checkpoints.best_score,
        "last_val": module.last_val_metrics,
        "converged_step": convergence.first_reached_step,
        "converged": convergence.first_reached_step is not None,
        "converge_threshold": float(t.converge_threshold),
        "train_seconds_this_session": round(seconds, 2),
        "trainable_parameters": n_trainable,
        "definitions": {
            MIN_ACC: "minimum accuracy over 3 heads (tok, depth, valid) x 3 fixed evaluation sets "
            "(train distribution, compositional, long), over non-PAD positions",
            "best_step": "step of the best checkpoint by val/min_acc (the analysed checkpoint)",
        },
    }
    info["status"] = "finished"
    atomic_write_json(layout.run_info, info)
    atomic_write_json(layout.final_metrics, final)  # written last: marks the run finished
    return final


def _check_resume_state(path: Path) -> int:
    """The step a resume file holds; a clear error if it is unreadable (loaded without pickle)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return int(state["global_step"])
    except Exception as err:
        raise PolymorphError(
            f"cannot resume from {path}: it is corrupt or not a polymorph checkpoint "
            f"({type(err).__name__}); delete it, or pass retrain=true to start this seed again"
        ) from err


def load_run_model(layout: RunLayout, which: str = "best"):
    """Rebuild a finished run's model from its saved config and a safetensors checkpoint."""
    if not layout.config.is_file():
        raise PolymorphError(f"{layout.root} has no config.yaml: not a polymorph run folder")
    cfg = OmegaConf.load(layout.config)
    if is_pretrained(cfg):  # the weights are the published ones: nothing of ours to load
        model = build_model(cfg.model)
        return model, cfg
    model = build_model(cfg.model)
    path = {"best": layout.best, "last": layout.last}.get(which, Path(which))
    try:
        load_weights(model, path)
    except CheckpointError as err:
        raise PolymorphError(str(err)) from err
    model.eval()
    return model, cfg


def run_activations(cfg: DictConfig, layout: RunLayout, model) -> dict[str, torch.Tensor]:
    """SAE training activations per site: cached in the run folder, recomputed when stale."""
    try:
        check_sites(model, list(cfg.sites))
    except SiteError as err:
        raise PolymorphError(str(err)) from err
    a = cfg.activations
    final = read_json(layout.final_metrics)
    if is_pretrained(cfg):
        corpus = OmegaConf.to_container(cfg.corpus, resolve=True)
        meta = {
            "n_sequences": str(a.n_sequences),
            "seq_len": str(a.seq_len),
            "offset": str(a.get("offset", 0)),
            "skip_positions": str(a.get("skip_positions", 1)),
            "corpus": str(sorted(corpus.items())),
            "checkpoint": f"{final.get('model_model_id')}@{final.get('model_revision')}",
        }
    else:
        meta = {
            "n_sequences": str(a.n_sequences),
            "seed": str(a.seed),
            "min_len": str(a.min_len),
            "max_len": str(a.max_len),
            "checkpoint": f"best (step {final.get('best_step')})",
        }
    store_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        str(a.get("dtype", "float32"))]
    out, missing = {}, []
    for site in cfg.sites:
        path = layout.activation_file(site)
        if path.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    stored = f.metadata() or {}
                if all(stored.get(k) == v for k, v in meta.items()):
                    out[site] = load_activations(path).float()
                    continue
            except Exception as err:  # noqa: BLE001 - an unreadable cache is recomputed
                log.warning("activation cache %s unreadable (%s): recomputing it", path, err)
        missing.append(site)
    if missing:
        tokens = batch_tokens(cfg, a, layout.root.parent, getattr(model, "tokenizer", None))
        mask = position_mask(cfg, tokens, a)
        fresh = collect_activations(model, tokens, missing, batch_size=a.batch_size, mask=mask,
                                    progress=bool(cfg.trainer.get("enable_progress_bar", True)))
        for site, acts in fresh.items():
            # stored at activations.dtype (float16 halves the disk for d=512); used as float32
            save_activations(layout.activation_file(site), acts.to(store_dtype), {**meta, "site": site})
            out[site] = acts.to(store_dtype).float()
    return {s: out[s] for s in cfg.sites}
