"""Data of ``adapterbank demo``: six trained LoRAs of all-MiniLM-L6-v2 and their domains' splits.

Made by ``python bench/loo_text.py --size small --make-demo-data``
(Benchmark A at its small size; ``manifest.json`` holds the recipe, versions and training losses).
Per domain (numpy, scipy, torch, sklearn, sympy, stdlib):

- ``adapter_config.json``, ``adapter_model.safetensors``: a PEFT LoRA (r=8, query/value of layers 3-5)
  trained for semantic search over the domain's docstrings (query: one-line summary, document: the rest);
- ``train.jsonl``: ``{"text", "name"}`` the training items (summary, newline, document), used for prototypes;
- ``test.jsonl``: ``{"query", "doc", "name"}`` the held-out pairs, never trained on.

The texts are docstrings of the packages installed when the data was made (versions in the manifest);
shipping them makes the demo independent of what is installed on the user's machine.
"""
