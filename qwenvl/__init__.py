"""qwenvl: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL fine-tuning trainer speaking the official
``qwen-vl-finetune`` arguments and data format (see ``python -m qwenvl.train --help``).

Importing this package is cheap: nothing here imports torch.
"""

__version__ = "0.1.0"
