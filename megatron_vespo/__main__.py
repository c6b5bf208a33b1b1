import sys

from megatron_vespo.cli import main

sys.exit(main())
