"""`python -m cfvit_cli …`: the `cfvit` command."""
import sys

from . import main

sys.exit(main())
