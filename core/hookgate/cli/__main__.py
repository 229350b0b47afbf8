"""`python -m hookgate.cli`: the same as the `hookgate` command."""

import sys

from hookgate.cli.entry import main

sys.exit(main())
