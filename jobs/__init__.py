"""The Ray side of cfvit-ray: thin jobs around the `cfvit` library.

- `common/`     storage (one S3 filesystem/client, one checkpoint resolver and cache), MLflow tracking
                (`with tracking.run(...)`), ray_env (the one `init_ray`)
- `train/`      the training job: config, Ray Data inputs, worker loop, DeepSpeed, driver
                (`python -m jobs.train` is the Ray job entrypoint)
- `configs/`    shipped training configs (`jobs/configs/NAME.yaml`)
- `tune/`       Ray Tune over α, β (+lr) and post-hoc η per FLOPs budget for every trial
- `calibrate/`  the exact η per budget for one trained model (maths: `cfvit.calibration`)
- `ops/`        cluster operations: Ray Jobs submission, ImageFolder → WebDataset shards
- `pipeline.py` the main job: train → calibrate → serve → classify over HTTP
- `reproduce/`  the paper's tables in miniature on Fashion-MNIST
- `cli/`        the `cfvit` command: one typer app for every verb

Nothing here is imported by `cfvit/`; `serve/` depends only on `cfvit_common`.
"""
