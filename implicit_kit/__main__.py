import sys

from .train._cli import main


sys.exit(main())
