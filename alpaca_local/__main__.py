import sys

from alpaca_local.cli.main import main

sys.exit(main())
