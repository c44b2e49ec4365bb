"""The training job: Ray Train `TorchTrainer` + DeepSpeed, data streamed by Ray Data, MLflow tracking.

- `config.py`   the job's YAML schema, `--set` overrides, up-front checks
- `data.py`     dataset URIs → Ray Data (ImageFolder / WebDataset / built-in Fashion-MNIST), preprocessing
- `worker.py`   `train_loop_per_worker`: setup / train_epoch / validate / checkpoint
- `deepspeed.py` the DeepSpeed config builder and the weights-only resume
- `driver.py`   `run_training(cfg)`: the trainer, MLflow run and model registration

`python -m jobs.train --config …` is the Ray job entrypoint (the `cfvit train` verb).
"""
from .config import ConfigError, JobConfig, load_config, parse_set
from .deepspeed import deepspeed_config
from .driver import TrainingOutcome, init_ray, prepare, run_training
from .worker import DS_TAG, EXPORT_DIR, STATE_FILE, train_loop_per_worker

__all__ = ["ConfigError", "DS_TAG", "EXPORT_DIR", "JobConfig", "STATE_FILE", "TrainingOutcome", "deepspeed_config",
           "init_ray", "load_config", "parse_set", "prepare", "run_training", "train_loop_per_worker"]
