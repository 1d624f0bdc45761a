"""Every name under which arc_peft keeps something on a user's model, in one place.

Modules and parameters (part of the state dict, so of every key a checkpoint holds):

* ``SLOT_ATTR``: a block's adapter slots (``blocks.0.arc_peft.attn.default.scale``);
* ``SHARED_ATTR``: state several sites share, held above them
  (``arc_peft_shared.default.attn-768.projection``);
* ``TASKS_ATTR``: per-task modules (an adapter's own classifier head).

Plain attributes in ``model.__dict__`` (neither modules nor state-dict entries, so a merged or
cleaned model is exactly the plain backbone; they follow the model through ``copy.deepcopy``):

* ``PLAN_ATTR``: the last site plan and the target-registry generation it was probed under;
* ``EXAMPLE_ATTR``: the user's ``example_input``, which later probes (merge) reuse;
* ``TRAINED_ATTR``: backbone module paths ``freeze_backbone(also=...)`` made trainable;
* ``BASE_ATTR``: the backbone's own modules that task modules replaced while active;
* ``MERGES_ATTR``: what ``merge_adapter(keep_original=True)`` needs to undo a merge.
"""

from __future__ import annotations

__all__ = [
    "BASE_ATTR",
    "DEFAULT_ADAPTER",
    "EXAMPLE_ATTR",
    "MERGES_ATTR",
    "PLAN_ATTR",
    "SHARED_ATTR",
    "SLOT_ATTR",
    "TASKS_ATTR",
    "TRAINED_ATTR",
    "__version__",
]

__version__ = "0.1.0"

# The name an adapter gets when none is given (and a file without one was saved under).
DEFAULT_ADAPTER = "default"

SLOT_ATTR = "arc_peft"
SHARED_ATTR = "arc_peft_shared"
TASKS_ATTR = "arc_peft_tasks"

PLAN_ATTR = "_arc_peft_plan"
EXAMPLE_ATTR = "_arc_peft_example"
TRAINED_ATTR = "_arc_peft_trained"
BASE_ATTR = "_arc_peft_base_modules"
MERGES_ATTR = "_arc_peft_merges"
