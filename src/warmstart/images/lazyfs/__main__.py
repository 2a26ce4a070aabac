"""``python -m warmstart.images.lazyfs``: run one lazy filesystem daemon."""

import sys

from warmstart.images.lazyfs.daemon import main

if __name__ == "__main__":
    sys.exit(main())
