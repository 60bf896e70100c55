"""The evaluation harness (``rdkv-hf eval``, ``rdkv-hf demo``), apart from the library a user imports.

* :mod:`.runner`: the grid of cells (perplexity, RULER-style tasks, attention distortion), resumable.
* :mod:`.methods`: the methods compared and how each one's cache is filled from one shared prefill.
* :mod:`.report`: tables, targets and the rate-distortion plot.
* :mod:`.tasks`: RULER-style task generators; :mod:`.prompts`: the demo's recall prompt.
* :mod:`.models`: the real models this project runs offline (SmolLM2-135M, Gemma-3-270m) and their
  shipped profiles; :mod:`.demo`: the demo.

Nothing here is imported by ``import rdkv_hf``.
"""
