"""`python -m genrecal_cache cache-teacher|inspect-cache ...`: the console commands by name. The launchers start a
part's job this way; with GENRECAL_DIE_WITH_PARENT=1 (a data-parallel copy, a Ray task's job) it dies with its parent.
"""

import os
import sys

from genrecal_cache.cli import cache_teacher_app, inspect_cache_app
from genrecal_cache.core.process import die_with_parent

COMMANDS = {"cache-teacher": cache_teacher_app, "inspect-cache": inspect_cache_app}

if __name__ == "__main__":
    if os.environ.pop("GENRECAL_DIE_WITH_PARENT", None) == "1":
        die_with_parent()
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m genrecal_cache {{{'|'.join(COMMANDS)}}} [OPTIONS]")
    COMMANDS[sys.argv.pop(1)]()
