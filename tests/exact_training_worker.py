"""One rank of the end-to-end exactness tests: runs every case of the spec in one process group
(see tests/exact_training.py) and saves what this rank found.

Usage: python tests/exact_training_worker.py SPEC_JSON.  SPEC: backend (torch | mpi), out (a
folder), cases ({name: case}).  Writes ``out/rank{R}.json``: {name: run_case's result}.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests import exact_training  # noqa: E402
from tests.dist_worker import make_comm  # noqa: E402


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    comm = make_comm(spec)
    results = {}
    for name, case in spec["cases"].items():
        start = time.perf_counter()
        results[name] = exact_training.run_case(case, comm)
        results[name]["seconds"] = time.perf_counter() - start
    with open(os.path.join(spec["out"], f"rank{comm.rank}.json"), "w") as f:
        json.dump(results, f)
    comm.barrier()
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
