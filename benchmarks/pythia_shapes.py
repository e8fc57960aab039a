"""What one PolyPythia seed costs on this machine, at Pythia-70m's real shapes (no download).

    python benchmarks/pythia_shapes.py                  # CPU, fp32
    python benchmarks/pythia_shapes.py --sequences 32   # a smaller slice, scaled up

A randomly initialised GPT-NeoX with pythia-70m's configuration (6 layers, d_model 512, 8 heads,
MLP 2048, vocabulary 50,304, parallel attention, rotary on a quarter of each head) is saved
locally and loaded through polymorph's own loader, so the measured path is the pipeline's. It
times, per seed:

* the activation pass of ``experiment=polypythia``: 256 windows x 256 tokens, 7 sites, measured
  on ``--sequences`` windows and scaled linearly (the forward is per batch of 16 windows);
* SAE training at one site: x8 (4,096 features), batch 4,096, measured over ``--sae-steps``
  Adam steps and scaled to the preset's 2,000 steps x 7 sites;
* the float32 Procrustes fit of one (pair, site) at d=512 on 64 x 255 rows.

Random weights have the right shapes and hence the right compute; nothing here measures quality.
The reference line is the toy: the same activation pass on the default Dyck model, so the ratio
says how much heavier a Pythia seed's activation stage is than a toy seed's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_pythia70m_shaped(folder: Path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from tests.helpers.tiny_lm import build_tokenizer

    tok = build_tokenizer(folder / "step143000")
    config = GPTNeoXConfig(
        vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25,
        use_parallel_residual=True, hidden_act="gelu", bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(str(folder / "step143000"))
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--sae-steps", type=int, default=20)
    args = parser.parse_args()

    from polymorph.activations import collect_activations
    from polymorph.align.procrustes import fit_rotation
    from polymorph.models.dyck import build_dyck_transformer
    from polymorph.models.pretrained import load_pretrained
    from polymorph.sae import SAETrainConfig, train_sae
    from polymorph.tasks.dyck import generate_training_tokens

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        build_pythia70m_shaped(Path(tmp))
        t0 = time.perf_counter()
        model = load_pretrained(tmp, "step143000", device="cpu", dtype="float32")
        load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    sites = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(6)]
    tokens = torch.randint(1, 50000, (args.sequences, 256))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    t0 = time.perf_counter()
    acts = collect_activations(model, tokens, sites, batch_size=16, mask=mask)
    act_s = time.perf_counter() - t0
    act_seed_s = act_s * 256 / args.sequences

    toy = build_dyck_transformer()
    toy_tokens = generate_training_tokens(4096, torch.Generator().manual_seed(0), min_len=2, max_len=48)
    toy_sites = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
                 "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    t0 = time.perf_counter()
    collect_activations(toy, toy_tokens, toy_sites, mask=toy_tokens != 0)
    toy_s = time.perf_counter() - t0

    x = acts[sites[3]]
    x = x.repeat(max(1, 4096 * 2 // x.shape[0] + 1), 1)[: 65280]
    cfg = SAETrainConfig.from_dict({
        "architecture": "relu_l1", "expansion": 8, "l1_coefficient": 1e-5, "k": None, "lr": 5e-4,
        "batch_size": 4096, "steps": args.sae_steps, "init_seed": "shared", "shared_init_seed": 0,
        "data_seed": 0})
    t0 = time.perf_counter()
    train_sae(x, cfg, init_seed=0, hook_name=sites[3], model_name="bench", progress_bar=False)
    sae_s = time.perf_counter() - t0
    sae_seed_s = sae_s / args.sae_steps * 2000 * len(sites)

    fit_x = torch.randn(64 * 255, 512)
    q, _ = torch.linalg.qr(torch.randn(512, 512))
    t0 = time.perf_counter()
    fit_rotation(fit_x @ q, fit_x, precision="float32")
    fit_s = time.perf_counter() - t0

    disk_acts = 256 * 255 * 512 * 2 * len(sites)
    disk_saes = (2 * 512 * 4096 + 4096 + 512) * 4 * len(sites)
    print(f"model: {n_params / 1e6:.1f}M parameters, loaded in {load_s:.1f} s")
    print(f"activations: {args.sequences} windows x 256 tokens, 7 sites: {act_s:.1f} s "
          f"-> {act_seed_s:.0f} s for the preset's 256 windows")
    print(f"reference (toy, 4096 sequences, 5 sites): {toy_s:.2f} s; ratio pythia/toy "
          f"activation pass: {act_seed_s / toy_s:.0f}x")
    print(f"SAE x8 at d=512, batch 4096: {sae_s / args.sae_steps:.2f} s/step -> "
          f"{sae_seed_s / 3600:.1f} h for 2000 steps x 7 sites")
    print(f"Procrustes fit d=512, 16,320 rows, float32: {fit_s:.2f} s per (pair, site)")
    print(f"disk per seed: activations {disk_acts / 1e6:.0f} MB (float16), SAEs {disk_saes / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
