"""``python -m unirec`` = the ``unirec`` command."""
import sys

from .cli import main

sys.exit(main())
