import sys

from gateskip.commands.cli import main

sys.exit(main())
