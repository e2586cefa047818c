"""qwenvl data layer.

Torch-free modules (no torch, transformers or PIL at import: safe to import from the fast vlsft CLI):
``annotation_check``, ``annotation_read``, ``annotations``, ``arguments``, ``dataset_use``, ``dictionary``,
``formats``, ``grounding``, ``jsonloc``, ``length_estimate``, ``length_sampler``, ``media_decode``, ``media_exist``,
``sample_rules``, ``token_budget``
(tests/test_torch_free_modules.py imports each and checks). The others need torch, PIL or numpy and must not be
imported from here.
"""
