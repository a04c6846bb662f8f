import sys

from llm_batch.cli.main import main

sys.exit(main())
