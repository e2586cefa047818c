"""Data arguments of ``qwenvl.train`` (torch-free), named as in the official trainer.

These names are the contract between ``vlsft`` (which renders them as ``--name value``) and the
trainer (which parses them with ``HfArgumentParser``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataArguments:
    dataset_use: str = field(default="", metadata={"help": "Datasets to train on: 'name[%percent],...' "
                             "(decimal percents allowed; above 100 up-samples, e.g. 'a%250' = 2.5 copies)."})
    dataset_dict: str | None = field(default=None, metadata={"help": "Path/URL of the dataset dictionary JSON "
                                     "(name -> data_path, annotation_path, length, sampling_rate|repeat_time)."})
    max_pixels: int = field(default=576 * 28 * 28, metadata={"help": "Image pixel budget (upper bound of H*W after resize)."})
    min_pixels: int = field(default=16 * 28 * 28, metadata={"help": "Image pixel floor (lower bound of H*W after resize)."})
    video_max_frames: int = field(default=8, metadata={"help": "Most frames sampled from a video."})
    video_min_frames: int = field(default=4, metadata={"help": "Fewest frames sampled from a video."})
    base_interval: float = field(default=2, metadata={"help": "Seconds between sampled video frames."})
    video_max_frame_pixels: int = field(default=32 * 28 * 28, metadata={"help": "Per-frame pixel budget for videos."})
    video_min_frame_pixels: int = field(default=4 * 28 * 28, metadata={"help": "Per-frame pixel floor for videos."})
    model_max_length: int = field(default=8192, metadata={"help": "Longest token sequence (per sample, or per packed "
                                  "bin). Over-long samples are skipped and counted; vision tokens are never cut."})
    data_flatten: bool = field(default=False, metadata={"help": "Concatenate each per-device batch into one row "
                               "(varlen attention; no padding)."})
    data_packing: bool = field(default=False, metadata={"help": "Greedily pack samples online into rows of at most "
                               "model_max_length tokens (varlen attention; no padding, no offline tool)."})
    max_bad_sample_ratio: float = field(default=0.01, metadata={"help": "Fail training when more than this fraction "
                                        "of the samples read so far were skipped as broken."})
