"""`python -m train_edits ...` is the `train_edits` command (ensemble.zoo builds named models this way)."""

import sys

from .cli import main

sys.exit(main())
