"""vlsft: validate, plan and launch Qwen2-VL / Qwen2.5-VL / Qwen3-VL fine-tuning runs."""

__version__ = "0.1.0"
