"""The training job: Ray Train `TorchTrainer` + DeepSpeed, data streamed by Ray Data, MLflow tracking.

- `config.py`   the job's YAML schema, `--set` overrides, up-front checks
- `data.py`     dataset URIs → Ray Data (ImageFolder / WebDataset / built-in Fashion-MNIST), preprocessing
- `worker.py`   `train_loop_per_worker`: setup / train_epoch / validate / checkpoint
- `deepspeed.py` the DeepSpeed config builder and the weights-only resume
- `driver.py`   `run_training(cfg)`: the trainer, MLflow run and model registration

`python -m jobs.train --config …` is the Ray job entrypoint (the `cfvit train` verb).
"""
from cfvit_common.lazy import lazy_exports

# Loaded on first use, so that this package's `cli.py` imports without torch or Ray.
__getattr__ = lazy_exports(__name__, {
    "ConfigError": ".config",
    "DS_TAG": ".worker",
    "EXPORT_DIR": ".worker",
    "JobConfig": ".config",
    "STATE_FILE": ".worker",
    "TrainingOutcome": ".driver",
    "deepspeed_config": ".deepspeed",
    "init_ray": ".driver",
    "load_config": ".config",
    "parse_set": ".config",
    "prepare": ".driver",
    "run_training": ".driver",
    "train_loop_per_worker": ".worker",
})
__all__ = ["ConfigError", "DS_TAG", "EXPORT_DIR", "JobConfig", "STATE_FILE", "TrainingOutcome", "deepspeed_config",
           "init_ray", "load_config", "parse_set", "prepare", "run_training", "train_loop_per_worker"]
