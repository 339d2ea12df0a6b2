import sys

from vllm_spense.offline.cli import main

sys.exit(main())
