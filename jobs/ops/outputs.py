"""A submitted job must not keep its results where they vanish.

Under Ray Jobs the entrypoint runs inside the job's uploaded working directory
(`…/runtime_resources/working_dir_files/_ray_pkg_…`), which Ray deletes with its session: a relative
`checkpoint.storage_path` (the shipped `./outputs/ray_results`) or a local MLflow store (the default
`sqlite:///mlflow.db`) would be written there. `cfvit submit` checks the entrypoint's config before
submitting; the training job checks itself when it finds it runs under Ray Jobs.
"""
from __future__ import annotations

import os
import shlex
from typing import Mapping, Optional, Sequence

from jobs.train.config import ConfigError, load_config

# Set by Ray's job supervisor in the entrypoint's environment.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Escape hatch for single-node clusters where a local absolute path is fine: `--env CFVIT_ALLOW_LOCAL_OUTPUTS=1`.
ALLOW_ENV = "CFVIT_ALLOW_LOCAL_OUTPUTS"
JOB_VERBS = ("train", "tune", "pipeline")
JOB_MODULES = {"jobs.train": "train", "jobs.tune": "tune"}


def under_ray_jobs(env: Mapping[str, str] = os.environ) -> bool:
    return RAY_JOB_ENV in env


def output_problems(cfg, env: Mapping[str, str]) -> list[str]:
    """What in a job config would be lost when the job runs on a cluster, each with the fix."""
    problems = []
    storage = cfg.checkpoint.storage_path
    if not storage.startswith("s3://"):
        if not os.path.isabs(os.path.expanduser(storage)):
            problems.append(f"checkpoint.storage_path {storage!r} is relative: on the cluster it resolves inside the "
                            f"job's uploaded working directory, which Ray deletes with the session. Use "
                            f"--set checkpoint.storage_path=s3://BUCKET/PREFIX (or a path every node shares)")
    if cfg.mlflow.enabled:
        uri = cfg.mlflow.tracking_uri or env.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        if is_local_tracking(uri):
            problems.append(f"MLflow would write to {uri!r}, a store in the job's working directory that vanishes "
                            f"with it. Use --env MLFLOW_TRACKING_URI=http://MLFLOW:5000 (a tracking server), or "
                            f"--set mlflow.enabled=false")
    return problems


def is_local_tracking(uri: str) -> bool:
    """A store in files (sqlite, file:, a folder) rather than a tracking server: node-local on a cluster."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def job_config_of(entrypoint: Sequence[str]) -> Optional[tuple[str, Optional[str], list[str]]]:
    """(verb, --config, --set items) when the entrypoint runs one of our jobs, else None.

    Knows `python -m jobs.train|jobs.tune|cfvit_cli VERB …` and `cfvit VERB …` (also inside `bash -c "…"`)."""
    argv = list(entrypoint)
    if len(argv) == 1:
        argv = shlex.split(argv[0])
    if len(argv) >= 3 and argv[-2] == "-c" and argv[0].endswith(("sh", "bash")):
        argv = shlex.split(argv[-1])
    verb, rest = None, []
    for i, a in enumerate(argv):
        if a == "-m" and i + 1 < len(argv):
            mod = argv[i + 1]
            if mod in JOB_MODULES:
                verb, rest = JOB_MODULES[mod], argv[i + 2:]
            elif mod == "cfvit_cli" and i + 2 < len(argv) and argv[i + 2] in JOB_VERBS:
                verb, rest = argv[i + 2], argv[i + 3:]
            break
        if os.path.basename(a) == "cfvit" and i + 1 < len(argv) and argv[i + 1] in JOB_VERBS:
            verb, rest = argv[i + 1], argv[i + 2:]
            break
    if verb is None:
        return None
    config, sets = None, []
    it = iter(range(len(rest)))
    for i in it:
        a = rest[i]
        if a in ("--config", "-c") and i + 1 < len(rest):
            config = rest[i + 1]
            next(it, None)
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a == "--set" and i + 1 < len(rest):
            sets.append(rest[i + 1])
            next(it, None)
        elif a.startswith("--set="):
            sets.append(a.split("=", 1)[1])
    return verb, config, sets


def check_entrypoint(entrypoint: Sequence[str], env: Mapping[str, str], working_dir: Optional[str]) -> list[str]:
    """Problems of a job entrypoint's config (empty when it is not one of our jobs or all is well)."""
    found = job_config_of(entrypoint)
    if found is None or env.get(ALLOW_ENV) == "1":
        return []

    verb, config, sets = found
    if config and working_dir and not os.path.isabs(config):
        local = os.path.join(working_dir, config)
        config = local if os.path.exists(local) else config
    try:
        cfg = load_config(config, sets, check_uris=False)
    except ConfigError as e:
        return [f"the job's config is invalid: {e}"]
    return output_problems(cfg, env)


def check_running_job(cfg, output: Optional[str] = None, output_flag: str = "--output") -> None:
    """Called by the jobs themselves: under Ray Jobs, refuse outputs that would vanish (ConfigError).
    `output` is a job's own output folder (tuning's summary, plot and winners), if it has one."""
    if not under_ray_jobs() or os.environ.get(ALLOW_ENV) == "1":
        return
    problems = output_problems(cfg, os.environ)
    if output is not None and not os.path.isabs(os.path.expanduser(output)):
        where = (f"the output folder {output!r} is relative (inside the job's working directory, deleted with the "
                 f"session)")
        if cfg.mlflow.enabled:  # the durable copy of summary, plot and winners is the MLflow run
            print(f"[notice] {where}: its summary, Pareto plot and winners are also logged to MLflow; pass "
                  f"{output_flag} /shared/path to keep a copy on disk", flush=True)
        else:
            problems.append(f"{where} and MLflow is off: pass {output_flag} /a/path/every/node/shares")
    if problems:

        raise ConfigError("this job runs under Ray Jobs and would lose its results:\n  " + "\n  ".join(problems)
                          + f"\n  (on a single-node cluster, --env {ALLOW_ENV}=1 accepts local outputs)")
