"""``hydra.utils.instantiate`` with errors a user can act on.

Objects a user swaps (the model family, the model builder, the LightningModule, callbacks,
strategies) come from ``_target_`` nodes. When building one fails, Hydra wraps the cause in an
InstantiationException whose message is a page long; here a PolymorphError raised by the
object itself reaches the user as itself, and a ``_target_`` that does not exist or does not
accept the node's keys becomes one line naming the config key to fix.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from polymorph.errors import PolymorphError


def build(node: DictConfig, where: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``; ``where`` is the node's config key (for messages)."""
    if node is None or "_target_" not in node:
        raise PolymorphError(f"{where} needs a _target_ (the class or function to build it with)")
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, PolymorphError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(", set env var HYDRA_FULL_ERROR")[0]
        root = err.__cause__
        while root is not None and root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, ValueError) and str(root):
            # the object's own check of a setting's value: its message says what to write
            raise PolymorphError(f"{where}: {str(root).splitlines()[0]}") from err
        because = f" ({type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''})" \
            if root is not None else ""
        raise PolymorphError(f"cannot build {where} (_target_: {node.get('_target_')}): "
                             f"{first}{because}; check {where}._target_ and its keys") from err
