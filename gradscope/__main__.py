"""``python -m gradscope``: the same CLI as the ``gradscope`` command."""

from gradscope.cli import run

if __name__ == "__main__":
    run()
