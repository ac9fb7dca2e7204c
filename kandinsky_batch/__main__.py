import sys

from kandinsky_batch.cli import main

sys.exit(main())
