#!/usr/bin/env python3
"""Pack a training run's prepared-scan cache for a machine without the data, or unpack it there.

    python scripts/scan_cache.py pack   out/run/prepared_scans  .devcache/prepared.npz
    python scripts/scan_cache.py unpack .devcache/prepared.npz  out/run/prepared_scans

See DeepMultimodalRegLib/training/scan_cache.py and docs/gpu_training.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepMultimodalRegLib.training.scan_cache import pack_cache, unpack_cache  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    action, source, target = sys.argv[1:]
    names = (pack_cache if action == "pack" else unpack_cache)(source, target)
    print(f"{action}ed {len(names)} files: {', '.join(names)}")
