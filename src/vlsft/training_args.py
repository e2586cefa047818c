"""Names the trainer accepts from ``transformers.TrainingArguments``, kept static so that ``vlsft print-args``
never imports transformers. Generated from transformers 5.24.0 (``dataclasses.fields(TrainingArguments)``);
``tests/test_config.py`` imports transformers and fails when this table drifts.

:func:`check_extra` validates ``training.extra`` (free-form ``--name value`` pass-through) against it.
"""

from __future__ import annotations

from typing import Any

from qwenvl.problems import did_you_mean
from vlsft.keymap import owned_by_yaml

TRAINING_ARGUMENT_NAMES: frozenset[str] = frozenset((
    'accelerator_config', 'activation_checkpointing', 'activation_checkpointing_kwargs', 'adam_beta1',
    'adam_beta2', 'adam_epsilon', 'auto_find_batch_size', 'average_tokens_across_devices', 'batch_eval_metrics',
    'bf16', 'bf16_full_eval', 'data_seed', 'dataloader_drop_last', 'dataloader_in_order',
    'dataloader_multiprocessing_context', 'dataloader_num_workers', 'dataloader_persistent_workers',
    'dataloader_pin_memory', 'dataloader_prefetch_factor', 'ddp_backend', 'ddp_broadcast_buffers',
    'ddp_bucket_cap_mb', 'ddp_find_unused_parameters', 'ddp_static_graph', 'ddp_timeout', 'debug', 'deepspeed',
    'disable_tqdm', 'do_eval', 'do_predict', 'do_train', 'enable_jit_checkpoint', 'eval_accumulation_steps',
    'eval_delay', 'eval_do_concat_batches', 'eval_on_start', 'eval_steps', 'eval_strategy',
    'eval_use_gather_object', 'fp16', 'fp16_full_eval', 'fsdp', 'fsdp_config', 'full_determinism',
    'gradient_accumulation_steps', 'gradient_checkpointing', 'gradient_checkpointing_kwargs',
    'greater_is_better', 'hub_always_push', 'hub_model_id', 'hub_private_repo', 'hub_revision', 'hub_strategy',
    'hub_token', 'ignore_data_skip', 'include_for_metrics', 'include_num_input_tokens_seen', 'label_names',
    'label_smoothing_factor', 'learning_rate', 'length_column_name', 'liger_kernel_config',
    'load_best_model_at_end', 'local_rank', 'log_level', 'log_level_replica', 'log_on_each_node',
    'logging_first_step', 'logging_nan_inf_filter', 'logging_steps', 'logging_strategy', 'lr_scheduler_kwargs',
    'lr_scheduler_type', 'max_grad_norm', 'max_steps', 'metric_for_best_model', 'neftune_noise_alpha',
    'num_train_epochs', 'optim', 'optim_args', 'optim_target_modules', 'output_dir', 'parallelism_config',
    'per_device_eval_batch_size', 'per_device_train_batch_size', 'prediction_loss_only', 'project',
    'push_to_hub', 'remove_unused_columns', 'report_to', 'restore_callback_states_from_checkpoint',
    'resume_from_checkpoint', 'run_name', 'save_on_each_node', 'save_only_model', 'save_steps', 'save_strategy',
    'save_total_limit', 'seed', 'skip_memory_metrics', 'tf32', 'torch_compile', 'torch_compile_backend',
    'torch_compile_mode', 'torch_empty_cache_steps', 'trackio_bucket_id', 'trackio_space_id',
    'trackio_static_space_id', 'train_sampling_strategy', 'use_cache', 'use_cpu', 'use_liger_kernel',
    'warmup_steps', 'weight_decay'
))

# Names the run YAML sets through its own keys: passing them in training.extra would give two sources of truth.
OWNED_BY_YAML: dict[str, str] = owned_by_yaml()

# Fields HfArgumentParser reads with nargs="+": a YAML list becomes several argv tokens (--label_names a b);
# every other field takes exactly one token (a mapping is passed as JSON, which dict-typed fields accept).
LIST_ARGUMENT_NAMES: frozenset[str] = frozenset(("debug", "include_for_metrics", "label_names"))

# TrainingArguments fields that hold credentials: they would end up in argv (visible in `ps`) and in logs.
SECRET_NAMES: dict[str, str] = {"hub_token": "HF_TOKEN"}


def check_extra(extra: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(name, message, hint) for every ``training.extra`` entry the trainer would reject or that the YAML owns."""
    out: list[tuple[str, str, str | None]] = []
    for name in extra:
        if name in SECRET_NAMES:
            out.append((name, "a secret cannot go in a run YAML or on the command line",
                        f"export {SECRET_NAMES[name]} instead"))
        elif name in OWNED_BY_YAML:
            out.append((name, "set by its own run YAML key", f"use {OWNED_BY_YAML[name]}"))
        elif name not in TRAINING_ARGUMENT_NAMES:
            hint = did_you_mean(name, TRAINING_ARGUMENT_NAMES | set(OWNED_BY_YAML))
            out.append((name, "not a transformers.TrainingArguments name", hint))
        elif isinstance(extra[name], list) and name not in LIST_ARGUMENT_NAMES:
            out.append((name, "takes one value, not a list", "write a single value (transformers reads "
                        f"--{name} as one token)"))
        elif isinstance(extra[name], list) and not all(isinstance(v, str | int | float) for v in extra[name]):
            out.append((name, "list items must be plain values", f"e.g. {name}: [labels]"))
    return out
