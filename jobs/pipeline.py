"""`ray job submit` entrypoint: the whole pipeline. The same as `mecpe pipeline` with these arguments:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py --config jobs/configs/local.yaml [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mecpe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
