import sys

from sslkd.cli import main

sys.exit(main())
