"""One rank of the decentralized multi-process test: runs every case of SPEC in one process group.

Usage: python tests/decentralized_worker.py SPEC_JSON with SPEC = {"cases": {name: case}, "out":
folder, "timeout_s": ...}; writes ``out/rank{R}.pt`` ({name: run_case result}).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from launch.comm.torch_dist import TorchCommunicator  # noqa: E402
from tests.decentralized_cases import run_case  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    comm = TorchCommunicator(device="cpu", timeout_s=spec.get("timeout_s", 60))
    results = {}
    for name, case in spec["cases"].items():
        comm.stats.reset()
        results[name] = run_case(case, comm)
    torch.save(results, os.path.join(spec["out"], f"rank{comm.rank}.pt"))
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
