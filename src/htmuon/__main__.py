import sys

from htmuon.cli import main

sys.exit(main())
