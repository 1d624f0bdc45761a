"""Adapter files: ``format.py`` (the safetensors header, parsed and bounded without torch),
``info.py`` (``read_adapter_info``), ``identity.py`` (the backbone a file was trained on),
``layout.py`` (a file's keys read off a model and matched against it), ``taskfiles.py`` (heads and
trained modules in a file), ``atomic.py`` (atomic writes), ``saving.py``, ``loading.py``,
``sources.py`` (paths, folders, ``hf-hub:`` sources) and ``hub.py`` (the Hub verbs)."""
