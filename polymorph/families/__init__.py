"""Model families: what differs between kinds of seeded models, behind one interface.

``conf/family/<name>.yaml`` picks one (``family=dyck``, the default; ``family=pretrained`` for
published or your own checkpoints). See :mod:`polymorph.families.base` for the interface.
"""

from __future__ import annotations

from omegaconf import DictConfig

from polymorph.errors import PolymorphError
from polymorph.families.base import (
    NO_TARGET,
    Checkpoint,
    ModelFamily,
    Readout,
    TokenBatch,
)
from polymorph.instantiation import build

__all__ = ["NO_TARGET", "Checkpoint", "ModelFamily", "Readout", "TokenBatch", "build_family"]


def build_family(cfg: DictConfig) -> ModelFamily:
    """The family object of a job's config (``cfg.family``)."""
    node = cfg.get("family")
    if node is None:
        raise PolymorphError("the config has no `family`; choose one with family=dyck or "
                             "family=pretrained (conf/family/)")
    family = build(node, "family", _recursive_=False)
    if not isinstance(family, ModelFamily):
        raise PolymorphError(f"family._target_={node.get('_target_')} is not a ModelFamily "
                             f"({type(family).__name__}); see polymorph/families/base.py")
    return family
