"""``python -m gradscope``: the same CLI as the ``gradscope`` command."""

import sys

from gradscope._entry import main

if __name__ == "__main__":
    sys.exit(main())
