"""Build DeepSpeed's async I/O op once (NVMe offload, `--plan ...,offload_to=nvme`): it compiles against libaio
(Debian/Ubuntu: apt-get install libaio-dev) into torch's extension cache, a few minutes on 2 cores. Prints one
JSON line: whether the op is usable and where it was built."""

import json
import os
import sys
import time

from minigpt.core.progress import note


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        print("error: DeepSpeed's async I/O op needs libaio's headers: apt-get install libaio-dev, then run this again",
              file=sys.stderr)
        return 2
    note("building DeepSpeed's async I/O op (a few minutes the first time; cached after)")
    start = time.perf_counter()
    op = builder.load(verbose=False)
    print(json.dumps({"async_io": "ok", "module": getattr(op, "__file__", str(op)),
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
