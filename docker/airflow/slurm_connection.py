"""Print the Airflow SSH connection (JSON) to the compose SLURM service, host key pinned from its share."""

import json
import os
import sys
from pathlib import Path

share = Path(sys.argv[1])
key_type, key = (share / "host_ed25519.pub").read_text().split()[:2]
print(
    json.dumps(
        {
            "conn_type": "ssh",
            "host": os.environ.get("OELLM_SLURM_HOST", "slurm"),
            "port": int(os.environ.get("OELLM_SLURM_SSH_PORT", "2222")),
            "login": os.environ.get("OELLM_SLURM_USER", "slurmuser"),
            "extra": {"key_file": str(share / "id_ed25519"), "host_key": f"{key_type} {key}"},
        }
    )
)
