"""Built-in contrastive datasets shipped with steerlab, one JSON file per set.

Read them through :mod:`steerlab.data` (``load_builtin``, ``neutral_prompts``,
``concept_words``); this package only holds the files so that ``importlib.resources`` finds them
in a source checkout and in an installed wheel alike.

Each ``<name>.json`` has the keys ``format`` (``"steerlab.builtin/1"``), ``name``,
``description``, ``source``, ``license``, ``positive_label``, ``negative_label``, ``pairs`` (a list
of ``{"positive": ..., "negative": ...}``), ``neutral`` (held-out prompts with neither side of the
concept) and ``positive_words`` / ``negative_words`` (single words, each with its leading space).
The text was written for steerlab and is not copied from any other dataset.
"""
