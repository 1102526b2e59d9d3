"""`ray job submit` entrypoint: data preparation into <output_dir>/data. The same as `mecpe data prepare` with these arguments:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/prepare_data.py --config jobs/configs/local.yaml [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mecpe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
