import sys

from fedrnd.cli.main import main

sys.exit(main())
