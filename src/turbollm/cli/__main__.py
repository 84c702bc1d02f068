import sys

from turbollm.cli.main import main

sys.exit(main())
