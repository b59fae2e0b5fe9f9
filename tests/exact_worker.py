"""One rank of the exactness tests: runs every case of the spec in one process group (see
tests/exact_cases.py) and saves what this rank found.

Usage: python tests/exact_worker.py SPEC_JSON.  SPEC: backend (torch | mpi), out (a folder),
cases ({name: case}), optionally ``training`` (true: the cases are tests/exact_training.py's, real
training through Simulation; default: tests/exact_cases.py's sync programs).  Writes
``out/rank{R}.json``: {name: run_case's result, or None}.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from launch.comm import base  # noqa: E402
from tests import exact_cases, exact_training  # noqa: E402
from tests.dist_worker import make_comm  # noqa: E402


def main() -> int:
    spec = json.loads(sys.argv[1])
    cases = exact_training if spec.get("training") else exact_cases
    if cases is exact_cases:
        base.CHAIN_CHUNK_BYTES = exact_cases.CHUNK_BYTES
    else:
        torch.set_num_threads(1)
    comm = make_comm(spec)
    results = {}
    for name, case in spec["cases"].items():
        start = time.perf_counter()
        results[name] = cases.run_case(case, comm)
        if results[name] is not None:
            results[name]["seconds"] = time.perf_counter() - start
    with open(os.path.join(spec["out"], f"rank{comm.rank}.json"), "w") as f:
        json.dump(results, f)
    comm.barrier()
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
