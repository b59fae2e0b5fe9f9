"""One rank of tests/test_own_loop_workers.py: runs every case (tests/colocated_workers_cases.py)
with one worker per process and saves this rank's result.

Usage: python tests/colocated_workers_worker.py SPEC_JSON.  SPEC: backend (torch | mpi), out (a
folder), cases ({name: case}).  Writes ``out/rank{R}.pt``: {name: the case's result}.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests import colocated_workers_cases  # noqa: E402
from tests.dist_worker import make_comm  # noqa: E402


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    comm = make_comm(spec)
    results = {name: colocated_workers_cases.run(case, comm) for name, case in spec["cases"].items()}
    torch.save(results, os.path.join(spec["out"], f"rank{comm.rank}.pt"))
    comm.barrier()
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
