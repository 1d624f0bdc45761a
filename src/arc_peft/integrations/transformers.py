"""A transformers ``TrainerCallback`` that keeps arc_peft adapters with every checkpoint.

``Trainer`` resumes by loading the checkpoint's ``model.safetensors`` into the model; transformers
5 renames keys on save and loads them without renaming back, so the adapter tensors (like the
layers it renames) are not restored, with only a "missing keys" warning. With the callback, each
checkpoint folder also holds the adapter file (``adapter.safetensors``), and a resumed run loads
it before the first step: every adapter tensor is the checkpoint's, bit for bit::

    from arc_peft.integrations.transformers import ArcPeftCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ArcPeftCallback()])
    trainer.train(resume_from_checkpoint=True)

Needs ``transformers`` (``pip install "arc-peft[hf]"``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..io.loading import load_adapter
from ..io.saving import save_adapter
from ..io.sources import ADAPTER_FILE
from ..runtime.slots import iter_slots
from ..runtime.wrappers import adapted_model

__all__ = ["ArcPeftCallback"]


class ArcPeftCallback(TrainerCallback):
    """Writes the adapter file into every checkpoint folder, and loads it back when a run
    resumes from one (``Trainer.train(resume_from_checkpoint=...)``)."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if model is None or not state.is_world_process_zero:
            return control
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, ADAPTER_FILE)
        # save_pretrained of an adapted transformers model has written it already; other models
        # (a timm backbone in a Trainer) are saved here.
        if os.path.isdir(folder) and not os.path.isfile(path) and iter_slots(adapted_model(model)):
            save_adapter(model, path)
        return control

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> Any:
        # Resuming: the trainer state (global_step) is the checkpoint's by now, and the model's
        # weights were loaded from it, without the adapters.
        if model is None or not state.global_step:
            return control
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isfile(os.path.join(folder, ADAPTER_FILE)):
            load_adapter(model, folder)
        elif iter_slots(adapted_model(model)):
            warnings.warn(
                f"ArcPeftCallback: the run resumes at step {state.global_step}, but {folder} "
                f"holds no {ADAPTER_FILE}: the adapters keep the values the model has now, not "
                "the checkpoint's. Load them yourself: arc_peft.load_adapter(model, folder)",
                stacklevel=2,
            )
        return control
