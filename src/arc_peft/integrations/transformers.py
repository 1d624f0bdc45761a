"""Hugging Face ``Trainer`` checkpoints that keep the adapters::

    from arc_peft.integrations.transformers import ArcPeftCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ArcPeftCallback()])
    trainer.train()                                    # checkpoint-N/adapter.safetensors too
    trainer.train(resume_from_checkpoint=True)         # adapters restored bit for bit

Why it is needed: ``Trainer`` saves a checkpoint with ``save_pretrained`` and resumes by loading
that file into the model, but transformers renames keys on the way out (ViT's
``vit.layers.N.attention.q_proj`` is saved as ``vit.encoder.layer.N.attention.attention.query``)
and does not rename them back on resume, so the adapter tensors are reported missing and keep
their fresh values. The callback writes the adapter file (``arc_peft.save_adapter``, head and
``freeze_backbone(also=...)`` modules included) into every checkpoint folder, and when a run
resumes it loads that file after the Trainer has restored the rest: the values are copied into
the same parameters, so the optimizer state the Trainer restored still belongs to them.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from ..io.loading import load_adapter
from ..io.saving import save_adapter
from ..io.sources import ADAPTER_FILE

__all__ = ["ArcPeftCallback"]

# The folder Trainer names each checkpoint (transformers.trainer_utils.PREFIX_CHECKPOINT_DIR).
CHECKPOINT_PREFIX = "checkpoint"


class ArcPeftCallback(TrainerCallback):
    """Store the adapter file in every ``Trainer`` checkpoint and load it back on resume.

    Args:
        name: The adapter to save (default: the active one, as ``save_adapter``).
        resume_from_checkpoint: The checkpoint folder the run resumes from, when it is not
            ``<output_dir>/checkpoint-<step>`` (the folder ``Trainer`` itself writes, and finds
            with ``resume_from_checkpoint=True``).
    """

    def __init__(
        self, name: str | None = None, resume_from_checkpoint: str | os.PathLike[str] | None = None
    ) -> None:
        self.name = name
        self.resume_from_checkpoint = resume_from_checkpoint

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
            save_adapter(model, os.path.join(folder, ADAPTER_FILE), name=self.name)
        return control

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> Any:
        if state.global_step == 0:
            return control  # a fresh run: nothing to restore
        folder = os.fspath(
            self.resume_from_checkpoint
            or os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        )
        if not os.path.isfile(os.path.join(folder, ADAPTER_FILE)):
            raise FileNotFoundError(
                f"ArcPeftCallback: the run resumes at step {state.global_step} but {folder} holds "
                f"no {ADAPTER_FILE}, so the adapters would restart from their initial values. "
                "Resume from a checkpoint written with this callback, or pass its folder: "
                "ArcPeftCallback(resume_from_checkpoint=...)"
            )
        load_adapter(model, folder, **({"name": self.name} if self.name else {}))
        return control
