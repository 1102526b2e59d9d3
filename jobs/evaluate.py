"""`ray job submit` entrypoint: scoring and report into <output_dir>. The same as `mecpe evaluate` with these arguments:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/evaluate.py --config jobs/configs/local.yaml [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mecpe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
