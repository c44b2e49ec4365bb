"""Online inference for CF-ViT on Ray Serve.

`serve.app:build_app` is the Serve application builder (used by `serve run`, `serve deploy`,
`serve/config.yaml` and `cfvit serve`). Importing this package is cheap: Ray, torch and FastAPI load
only in the submodules that need them.
"""
