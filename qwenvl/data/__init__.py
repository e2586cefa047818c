"""qwenvl data layer.

Torch-free modules (safe to import from the fast vlsft CLI): ``dataset_use``, ``dictionary``,
``annotations``. Everything that needs torch/transformers lives in other modules of this package
and must not be imported from here.
"""
