"""The world a launch runs in (torch-free): cluster topology taken from SLURM / PyTorchJob variables, the
``storage.*`` environment variables with ``${VAR}`` references resolved, and the environment torchrun and
every rank get. Used by :func:`vlsft.plan.build_plan` (which re-exports these names) and ``vlsft train``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from qwenvl.problems import Problem

if TYPE_CHECKING:
    from vlsft.config import RunConfig

STORAGE_ENV = {
    "endpoint_url": "AWS_ENDPOINT_URL",
    "region": "AWS_DEFAULT_REGION",
    "profile": "AWS_PROFILE",
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
    "addressing_style": "VLSFT_S3_ADDRESSING_STYLE",
}


# --------------------------------------------------------------------------- topology

LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def apply_slurm(cfg: RunConfig, environ: Mapping[str, str]) -> list[str]:
    """Fill ``distributed.*`` from ``SLURM_*`` where the YAML/overrides did not set them (in place).

    Returns what was taken, as ``distributed.key=value`` strings. Keys set in the YAML or by an override
    win; with ``rdzv_endpoint`` set only ``nnodes`` is taken (the rendezvous assigns ranks). A one-node SLURM job
    takes no address or port, so it launches ``torchrun --standalone`` like any single machine.
    """
    from vlsft.launch import slurm_topology

    dist = cfg.distributed
    explicit = dist.model_fields_set
    taken = []
    topology = slurm_topology(environ)
    if topology:
        nnodes = dist.nnodes if "nnodes" in explicit else topology.get("nnodes", dist.nnodes)
        if nnodes == 1:  # a one-node job launches --standalone (a free port): two jobs sharing a node never collide
            topology = {k: v for k, v in topology.items() if k not in ("master_addr", "master_port")}
    for key, value in (topology or pytorchjob_topology(environ)).items():
        if dist.rdzv_endpoint and key != "nnodes":
            continue
        current = getattr(dist, key)
        if (key not in explicit or current is None) and current != value:
            setattr(dist, key, value)
            taken.append(f"distributed.{key}={value}")
    return taken


def pytorchjob_topology(environ: Mapping[str, str]) -> dict[str, object]:
    """``nnodes`` / ``nproc_per_node`` / ``node_rank`` / ``master_addr`` / ``master_port`` from the variables a
    Kubeflow PyTorchJob (or any launcher speaking torchrun's ``PET_*`` names) sets; empty elsewhere. Inside a
    torchrun rank (``LOCAL_RANK`` set) nothing is taken."""
    if "LOCAL_RANK" in environ or not any(k.startswith("PET_") for k in environ):
        return {}
    out: dict[str, object] = {}
    for key, var in (("nnodes", "PET_NNODES"), ("nproc_per_node", "PET_NPROC_PER_NODE"),
                     ("node_rank", "PET_NODE_RANK"), ("master_port", "PET_MASTER_PORT")):
        value = environ.get(var, "").strip()
        if value.isdigit():
            out[key] = int(value)
    if environ.get("PET_MASTER_ADDR", "").strip():
        out["master_addr"] = environ["PET_MASTER_ADDR"].strip()
    return out


def topology_source(environ: Mapping[str, str]) -> str:
    from vlsft.launch import slurm_topology

    return "SLURM" if slurm_topology(environ) else "PyTorchJob (PET_*)"


def check_topology(cfg: RunConfig, slurm: list[str], problems: list[Problem], warnings: list[str],
                    source: str | None = None) -> None:
    """Multi-node consistency, checked after SLURM filled in what the YAML left open."""
    dist = cfg.distributed
    from_slurm = f" (from {source or 'SLURM'})" if slurm else ""
    tr = cfg.training
    if slurm and tr.global_batch_size is not None:  # re-solve accumulation for the node count SLURM gave
        per_step = tr.per_device_train_batch_size * dist.nproc_per_node * dist.nnodes
        if tr.global_batch_size % per_step:
            problems.append(Problem("error", f"global_batch_size {tr.global_batch_size} is not a multiple of "
                                    f"{tr.per_device_train_batch_size} per device x {dist.nproc_per_node} per node "
                                    f"x {dist.nnodes} node(s) = {per_step}{from_slurm}",
                                    key="training.global_batch_size", hint="pick a global batch that this job's "
                                    "node count divides, or set distributed.nnodes explicitly",
                                    **cfg.where("training", "global_batch_size")))
        else:
            tr.gradient_accumulation_steps = tr.global_batch_size // per_step
    if dist.node_rank >= dist.nnodes:
        problems.append(Problem("error", f"node_rank {dist.node_rank} must be below nnodes {dist.nnodes}{from_slurm}",
                                key="distributed.node_rank", hint=f"machines count 0 .. {dist.nnodes - 1}",
                                **cfg.where("distributed", "node_rank")))
    if dist.rdzv_endpoint:
        ignored = sorted({"master_addr", "master_port", "node_rank"} & dist.model_fields_set)
        if ignored:
            warnings.append(f"distributed.rdzv_endpoint {dist.rdzv_endpoint} is set, so "
                            f"{', '.join('distributed.' + k for k in ignored)} "
                            f"{'is' if len(ignored) == 1 else 'are'} ignored (the c10d rendezvous assigns ranks); "
                            "delete one side")
        return
    if dist.nnodes > 1 and dist.master_addr is None:
        problems.append(Problem("error", f"nnodes is {dist.nnodes} but distributed.master_addr is not set: the other "
                                "machines cannot find rank 0", key="distributed.master_addr",
                                hint="set distributed.master_addr=<host name or IP of the node_rank 0 machine> "
                                "(the same on every node), run under SLURM, or set distributed.rdzv_endpoint",
                                **cfg.where("distributed", "nnodes")))
    elif dist.nnodes > 1 and dist.master_addr in LOOPBACK:
        warnings.append(f"distributed.master_addr is {dist.master_addr} with nnodes {dist.nnodes}: other machines "
                        "cannot reach a loopback address (fine only when every node rank runs on this machine); "
                        "use the rank-0 machine's host name or IP")


# --------------------------------------------------------------------------- environment

_ANY_REF = re.compile(r"^\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}|"
                      r"(?P<bare>[A-Za-z_][A-Za-z0-9_]*))$")


def resolve_reference(value: str, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(value, None)`` for a literal; a ``${VAR}`` / ``$VAR`` / ``${VAR:-default}`` reference resolved from
    ``environ`` -> ``(resolved, VAR)``, ``(None, VAR)`` when unset without a default. (Secret fields only ever
    hold ``${VAR}``: the config rejects the other forms there.)"""
    m = _ANY_REF.match(value.strip())
    if m is None:
        return value, None
    name = m.group("braced") or m.group("bare")
    resolved = environ.get(name)
    if (resolved is None or resolved == "") and m.group("default") is not None:
        resolved = m.group("default")
    return resolved, name


def storage_overrides(cfg: RunConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables the run's ``storage.*`` sets (``${VAR}`` references resolved; unset ones skipped)."""
    overrides: dict[str, str] = {}
    for key, var in STORAGE_ENV.items():
        value = getattr(cfg.storage, key)
        if value is not None:
            value, _ = resolve_reference(value, environ)
        if value is not None:
            overrides[var] = value
    return overrides


def storage_environment(cfg: RunConfig, environ: Mapping[str, str]):
    """Context manager: this process's environment with the run's ``storage.*`` applied (for reading s3://)."""
    from qwenvl import storage

    return storage.environment(storage_overrides(cfg, environ))


def extensions_cache(prefix: str | None = None) -> str:
    """Where DeepSpeed/torch JIT-built ops are cached: one folder per Python environment (ops built against one
    environment's torch must not be loaded by another's), under ~/.cache/vlsft/."""
    import hashlib

    prefix = os.path.realpath(prefix or sys.prefix)
    tag = hashlib.sha1(prefix.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return str(Path.home() / ".cache" / "vlsft" / "torch_extensions" / f"{Path(prefix).name}-{tag}")


def child_environment(plan_env: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """The environment torchrun and every rank get: the caller's (``environ``), then the plan's (``plan_env``:
    :attr:`vlsft.plan.LaunchPlan.env`, W&B and storage), then defaults for what neither set: a per-environment
    TORCH_EXTENSIONS_DIR, unbuffered output, and PYTHONSAFEPATH so a folder named ``qwenvl`` in the working
    directory (an official qwen-vl-finetune checkout) cannot shadow the installed trainer."""
    env = dict(environ)
    env.update(plan_env)
    env.setdefault("TORCH_EXTENSIONS_DIR", extensions_cache())
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONSAFEPATH"] = "1"
    return env
