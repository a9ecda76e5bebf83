"""`python -m genrecal_train train-student|eval-student ...`: the console commands by name. (`torchrun ... -m
genrecal_train.cli` starts train-student, as docs/DESIGN.md's "Distributed" shows.)
"""

import sys

from genrecal_train.cli import eval_student_app, train_student_app

COMMANDS = {"train-student": train_student_app, "eval-student": eval_student_app}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m genrecal_train {{{'|'.join(COMMANDS)}}} [OPTIONS]")
    COMMANDS[sys.argv.pop(1)]()
