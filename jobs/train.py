"""Ray Job entrypoint for training (Ray Train + DeepSpeed): the same as `raygpt train ARGS`.

    python jobs/train.py ARGS                      # on a cluster node, or locally
    raygpt submit train --address http://HOST:8265 -- ARGS

Thin on purpose: all options and logic live in the stage's CLI and run(cfg), so a job and an
interactive run behave the same. Does not: parse anything itself.
"""

import sys
from pathlib import Path

# the job's working_dir is the project root; make it importable even without `pip install -e .`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
