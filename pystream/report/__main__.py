import sys

from .html import main

sys.exit(main())
