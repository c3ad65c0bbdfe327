"""`python -m aurora ...` is the `aurora` command."""
import sys

from aurora.cli import main

sys.exit(main())
