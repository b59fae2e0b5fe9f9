"""One rank of the own loop of tests/test_own_loop_store.py on gloo: ``python
tests/own_loop_store_worker.py SPEC`` with SPEC ``{"out", "ckpt", "stop", "lr"}`` (stop: exit the
process right after that step, on every rank, without closing -- as a killed job; the step is a
sync, so the passive ranks see it); writes ``error-rank<R>.txt`` when the run raises a
ValueError."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from launch.comm.torch_dist import TorchCommunicator  # noqa: E402
from tests.test_own_loop_store import run  # noqa: E402


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    comm = TorchCommunicator(device="cpu", timeout_s=60)
    try:
        run(Path(spec["out"]), Path(spec["ckpt"]), stop=spec.get("stop"), lr=spec.get("lr", 0.01), comm=comm,
            at_stop=lambda: os._exit(0))
    except ValueError as err:
        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        (Path(spec["out"]) / f"error-rank{comm.rank}.txt").write_text(str(err))
        return 2
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
