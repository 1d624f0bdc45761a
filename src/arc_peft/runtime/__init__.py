"""What runs inside an adapted model: ``slots.py`` (the adapters of each site, applied by forward
hooks), ``shared.py`` (state several sites share, held above them), ``heads.py`` (per-task
modules such as classifier heads), ``multitask.py`` (the active adapter, mixed-task batches),
``wrappers.py`` (DDP / FSDP / compiled wrappers, modules holding an adapted model),
``inputgrad.py`` (adapters inside reentrant activation checkpointing), ``pretrained.py`` (the
``save_pretrained`` warning) and ``foreign.py`` (peft's layers in the same model)."""
