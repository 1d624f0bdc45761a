"""What runs inside an adapted model: ``slots.py`` (the adapters of each site, applied by forward
hooks), ``shared.py`` (state several sites share, held above them), ``heads.py`` (per-task
modules such as classifier heads), ``multitask.py`` (the active adapter, mixed-task batches) and
``wrappers.py`` (DDP / FSDP / compiled wrappers)."""
