"""What the jobs and the server share, below both of them (imports nothing of the project but `cfvit`).

- `storage`      one S3 filesystem and client (botocore retries, pyarrow timeouts), the download cache
- `tracking`     MLflow: runs (`with tracking.run(...)`), metrics, plots, registered models, downloads
- `checkpoints`  one resolver: local folder, `s3://…` or `models:/…` → a local checkpoint folder
- `ray_env`      the one `init_ray`, `free_port`
- `logs`         third-party logs into a file, the reader's lines on the terminal
- `progress`     the training progress bar
- `tables`       result tables that fit 80 columns
"""
