"""The old name of jobs/search.py, kept for the commands of older notes: it runs the same main."""

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "search.py"), run_name="__main__")
