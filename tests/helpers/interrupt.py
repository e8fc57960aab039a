"""Interrupt a training run at a given step, as Ctrl-C would."""

from __future__ import annotations

import signal

import pytest


def train_interrupted_at(cfg, step: int, monkeypatch) -> None:
    """Run ``train(cfg)`` with a KeyboardInterrupt raised at ``step``; Lightning's graceful
    shutdown then exits (SystemExit, asserted). The training step is restored afterwards."""
    from polymorph.pipeline import train
    from polymorph.training import transformer_module

    original = transformer_module.DyckTransformerModule.training_step

    def interrupt(self, batch, batch_idx):
        if self.global_step == step:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    handler = signal.getsignal(signal.SIGINT)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(transformer_module.DyckTransformerModule, "training_step", interrupt)
            with pytest.raises(SystemExit):
                train(cfg)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning installs its own handler
