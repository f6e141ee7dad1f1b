"""`python -m fanformer.cli` (as torchrun runs it)."""

import sys

from fanformer.cli import main

sys.exit(main())
