"""`ray job submit` entrypoint: the infer step.

    ray job submit --working-dir . -- python jobs/infer.py --config jobs/configs/local.yaml [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mecpe.pipeline import main_step  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_step("infer", sys.argv[1:]))
