"""Stopping a rank on SIGINT / SIGTERM / SIGHUP: quietly, with a checkpoint when training has begun.

* Before training starts (loading, data preparation) the first signal raises :class:`Stopped`;
  ``qwenvl.train.main`` turns it into exit status 128 + N with no traceback.
* During training the first signal only sets a flag; :class:`SaveOnSignalCallback` then ends the
  run at the next step boundary with a checkpoint (``should_save`` + ``should_training_stop``). The
  decision is all-reduced across ranks, so every rank stops at the same step (ZeRO-3 saves collectively).
  ``run()`` sees :func:`received` and skips the final-model save.
* Repeats of a signal are ignored: torchrun re-sends the signal it got to every rank, and the launcher
  (``vlsft train``) escalates to SIGKILL on a second Ctrl-C or after its grace period.
* :func:`stop_with_launcher`: a rank whose parent (torchrun) disappears, e.g. after ``kill -9`` of ``vlsft``
  (which takes torchrun down at once), signals itself SIGTERM and exits after ``grace_s`` (10 s) if still alive
  - also in the middle of a checkpoint save - so no rank outlives its launcher.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger("qwenvl.train")

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


class Stopped(BaseException):
    """A stop signal arrived before training began (BaseException: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_state = {"signum": None, "training": False}


def received() -> int | None:
    """The first stop signal received by this process, or None."""
    return _state["signum"]


def _handler(signum, _frame) -> None:
    if _state["signum"] is not None:
        return
    _state["signum"] = signum
    if not _state["training"]:
        raise Stopped(signum)


def install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        try:
            signal.signal(s, _handler)
        except (OSError, ValueError):  # pragma: no cover
            pass


def stop_with_launcher(grace_s: float = 10.0, poll_s: float = 1.0) -> None:
    """Under torchrun: watch the parent; when it is gone, stop this rank (see module docstring)."""
    if not os.environ.get("TORCHELASTIC_RUN_ID") and "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()
    if parent <= 1:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-launcher", daemon=True).start()


def make_callback():
    from transformers import TrainerCallback

    class SaveOnSignalCallback(TrainerCallback):
        """On the first stop signal: checkpoint at the next step boundary and end training (every rank alike)."""

        def on_train_begin(self, args, state, control, **kwargs):
            _state["training"] = True
            if _state["signum"] is not None:  # arrived while the Trainer was setting up
                control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            if _any_rank_stopping(args):
                control.should_save = True
                control.should_training_stop = True
                if state.is_world_process_zero:
                    logger.warning("stop signal: saving a checkpoint at step %d, then stopping", state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            _state["training"] = False

    return SaveOnSignalCallback()


def _any_rank_stopping(args) -> bool:
    mine = _state["signum"] is not None
    try:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        device = args.device if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if mine else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    except Exception as e:  # noqa: BLE001 - never let the stop check break a healthy run
        logger.debug("stop-signal all_reduce: %s", e)
        return mine
