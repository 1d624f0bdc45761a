"""Optional integrations with training frameworks, each imported on its own (it imports its
framework): ``arc_peft.integrations.transformers`` (the ``Trainer`` callback)."""
