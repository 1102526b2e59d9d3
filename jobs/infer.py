"""`ray job submit` entrypoint: two-stage inference (defaults: the prepared test split -> <output_dir>/inference). The same as `mecpe infer` with these arguments:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/infer.py --config jobs/configs/local.yaml [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mecpe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
