import sys

from airflow_oellm.localjobs.cli import main

sys.exit(main())
