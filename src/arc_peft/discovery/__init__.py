"""Finding where adapters go, by one probe forward: ``probe.py`` records the ops and module calls,
``graph.py`` reads the data flow off the recording, ``sites.py`` finds the attention and MLP sites
(``SitePlan``), ``inputs.py`` makes the probe input a model declares, ``targets.py`` holds
per-module-type knowledge (user overrides, built-in exact merge rules from ``merge_rules.py``),
``fold.py`` folds an affine input map into the layers reading a site's input, and
``models_table.py`` renders the supported-models table."""
