"""`ray job submit` entrypoint: one training run (--task emotion|cause). The same as `mecpe train` with these arguments:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --config jobs/configs/local.yaml [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mecpe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
