"""sae_transfer: does seed a's SAE reconstruct seed b, raw and after rotation?

Per (pair (a, b), site), all on the scored batch (held-out eval batch unless
``analysis.score_on=fit``):

* ceiling: SAE_a on a's own activations;
* naive:   SAE_a on b's activations as they are;
* rotated: SAE_a on b's activations mapped into a's frame by the fitted rotation
  (scored in a's frame: x = R(x_b), x_hat = SAE_a(x));
* floor:   predicting the per-dimension mean of a's activations;

each in both EV definitions, plus firing-pattern overlap: per feature, the
Pearson correlation over rows of SAE_a's activation on a versus on b (raw, and
rotated), averaged over features active on both sides.
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymorph.align.metrics import EV_DEFINITIONS, explained_variance
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import ev_bars

KINDS = ("ceiling", "naive", "rotated", "floor")


@torch.no_grad()
def sae_codes_and_reconstruction(sae, x: torch.Tensor, batch_size: int = 8192):
    feats, recon = [], []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(dtype=sae.dtype, device=sae.device)
        f = sae.encode(xb)
        feats.append(f.float().cpu())
        recon.append(sae.decode(f).float().cpu())
    return torch.cat(feats), torch.cat(recon)


def standardised_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature centred codes scaled to unit norm over rows, and which features vary at all."""
    centred = codes - codes.mean(0)
    norms = centred.norm(dim=0)
    varies = norms > 0
    return centred / norms.clamp(min=1e-30), varies


def firing_overlap(std_a: tuple[torch.Tensor, torch.Tensor], codes_b: torch.Tensor) -> dict:
    """Mean per-feature Pearson correlation between two row-aligned code matrices.

    ``std_a`` is :func:`standardised_codes` of the first matrix (computed once per site).
    """
    za, varies_a = std_a
    zb, varies_b = standardised_codes(codes_b)
    ok = varies_a & varies_b
    corr = (za * zb).sum(0)[ok]
    return {
        "mean_pearson": float(corr.double().mean()) if ok.any() else float("nan"),
        "n_features_compared": int(ok.sum()),
    }


class SAETransfer(AnalysisCallback):
    name = "sae_transfer"

    def __init__(self, save_transferred: bool = True) -> None:
        self.save_transferred = save_transferred

    def run(self, ctx) -> dict:
        rows, skipped = [], []
        own: dict = {}  # (seed, site) -> SAE a's codes and reconstruction of its own activations
        for (a, b), site in ctx.progress(
            [(p, s) for p in ctx.pairs for s in ctx.sites], desc="sae_transfer (pair, site)"
        ):
            saved = ctx.saes.get(a, {}).get(site)
            if saved is None:
                skipped.append(f"pair {a},{b} at {site}: seed {a} has no SAE there")
                continue
            sae = saved.sae
            x_a, x_b = ctx.scoring_acts(a, site), ctx.scoring_acts(b, site)
            rotation = ctx.rotation(a, b, site)
            x_b_in_a = rotation.apply(x_b).float()
            if (a, site) not in own:
                codes_a, rec_a = sae_codes_and_reconstruction(sae, x_a)
                own[(a, site)] = (standardised_codes(codes_a), rec_a, float((codes_a != 0).sum(1).double().mean()))
            std_a, rec_a, l0_a = own[(a, site)]
            codes_naive, rec_naive = sae_codes_and_reconstruction(sae, x_b)
            codes_rot, rec_rot = sae_codes_and_reconstruction(sae, x_b_in_a)
            floor = x_a.double().mean(0, keepdim=True).expand_as(x_a)
            row = {"pair": [a, b], "site": site}
            for kind, (x_hat, x) in {
                "ceiling": (rec_a, x_a),
                "naive": (rec_naive, x_b),
                "rotated": (rec_rot, x_b_in_a),
                "floor": (floor, x_a),
            }.items():
                for definition, value in explained_variance(x_hat, x).items():
                    row[f"{kind}_{definition}"] = value
            row["firing_overlap_raw"] = firing_overlap(std_a, codes_naive)
            row["firing_overlap_rotated"] = firing_overlap(std_a, codes_rot)
            row["l0_ceiling"] = l0_a
            if self.save_transferred:
                row["transferred_sae"] = self._save(ctx, saved, rotation, a, b, site)
            rows.append(row)
        return {
            "definitions": {
                **EV_DEFINITIONS,
                "ceiling": "SAE of seed a on seed a's own activations",
                "naive": "SAE of seed a on seed b's activations, unchanged",
                "rotated": "SAE of seed a on seed b's activations mapped into a's frame by the "
                "rotation fitted on the fit batch (EV computed in a's frame)",
                "floor": "predict the per-dimension mean of seed a's activations",
                "firing_overlap": "mean over features of the Pearson correlation (over rows) of SAE a's "
                "activation on a versus on b (raw / rotated); features constant on either side excluded",
                "mean_pearson": "that mean over the n_features_compared features",
                "scored_on": f"the {ctx.score_batch} batch",
            },
            "rows": rows,
            "skipped": skipped,
        }

    def _save(self, ctx, saved, rotation, a: int, b: int, site: str) -> str:
        from polymorph.align.transfer import transfer_sae
        from polymorph.sae.io import save_sae

        folder = ctx.out_dir / "transferred_saes" / f"seed={a}_to_seed={b}" / site
        moved = transfer_sae(saved.sae, rotation)
        meta = getattr(moved.cfg, "metadata", None)
        if meta is not None and getattr(meta, "model_name", None):
            # it now reads seed b's residual stream at the same hook
            meta.model_name = f"{meta.model_name} -> transferred to seed={b}"
        metadata = {
            **saved.metadata,
            "transferred": {
                "from_seed": a,
                "to_seed": b,
                "site": site,
                "meaning": f"SAE trained on seed {a}, rewritten to read seed {b}'s activations "
                f"directly (rotation fitted on the analysis fit batch, group {ctx.group})",
            },
        }
        save_sae(moved, folder, metadata=metadata, metrics={})
        return str(folder.relative_to(ctx.out_dir))

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for row in result["rows"]:
            key = f"seed={row['pair'][1]}/{row['site']}"
            for kind in KINDS:
                out[f"{key}/{kind}_ev_standard"] = row[f"{kind}_ev_standard"]
        return out

    def tables(self, result: dict):
        cols = ["seed_a", "seed_b", "site"] + [
            f"{k}_{d}" for k in KINDS for d in ("ev_published", "ev_standard")
        ]
        rows = [
            [r["pair"][0], r["pair"][1], r["site"]]
            + [r[f"{k}_{d}"] for k in KINDS for d in ("ev_published", "ev_standard")]
            for r in result["rows"]
        ]
        return {"sae_transfer_ev": (cols, rows)}

    def per_site_summary(self, ctx, result: dict) -> dict[str, dict[str, float]]:
        """Mean over pairs of each EV kind per site."""
        out = {}
        for site in ctx.sites:
            rows = [r for r in result["rows"] if r["site"] == site]
            if not rows:
                continue
            out[site] = {
                f"{k}_{d}": sum(r[f"{k}_{d}"] for r in rows) / len(rows)
                for k in KINDS
                for d in ("ev_published", "ev_standard")
            }
            for kind in ("raw", "rotated"):
                vals = [r[f"firing_overlap_{kind}"]["mean_pearson"] for r in rows]
                out[site][f"firing_overlap_{kind}"] = sum(vals) / len(vals)
        return out

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        summary = self.per_site_summary(ctx, result)
        if not summary:
            return []
        path = fig_dir / "sae_transfer_ev.png"
        ev_bars(summary, KINDS, "ev_standard", path, f"SAE transfer to the anchor's SAE (mean over pairs, {ctx.score_batch} batch)")
        return [path]

    def report(self, ctx, result: dict, figures) -> str:
        summary = self.per_site_summary(ctx, result)
        lines = [
            "## SAE transfer (`sae_transfer`)",
            "",
            f"Seed a's SAE on: its own activations (ceiling), seed b's raw activations (naive), seed b's "
            f"activations rotated into a's frame (rotated); floor = predict a's mean. Mean over "
            f"{len(ctx.pairs)} pair(s), scored on the {ctx.score_batch} batch. EV = ev_standard "
            f"(ev_published in brackets); both defined in results.json.",
            "",
            "| site | ceiling | naive | rotated | floor | firing overlap raw | rotated |",
            "|---|---|---|---|---|---|---|",
        ]
        for site, s in summary.items():
            cells = [
                f"{s[f'{k}_ev_standard']:.3f} ({s[f'{k}_ev_published']:.3f})" for k in KINDS
            ]
            lines.append(
                f"| `{site}` | " + " | ".join(cells)
                + f" | {s['firing_overlap_raw']:.3f} | {s['firing_overlap_rotated']:.3f} |"
            )
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        if result["skipped"]:
            lines += ["", "Skipped: " + "; ".join(result["skipped"])]
        return "\n".join(lines)
