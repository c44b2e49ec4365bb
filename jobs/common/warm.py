"""Runs in every Ray worker process of a training or tuning job as it starts (`worker_process_setup_hook`).

Ray keeps a pool of idle worker processes; a Train worker (or a Ray Data task) that lands on one of them
finds torch, timm, DeepSpeed and cfvit already imported, instead of spending the first ~10 s of every
trial on imports. Nothing else is done here: no state, no threads.
"""


def preload() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import deepspeed  # noqa: F401
        import timm  # noqa: F401
        import torch  # noqa: F401

        import cfvit  # noqa: F401
