"""`python -m msif.testing`: serve a GCS emulator (bucket msif-test) until interrupted."""

import sys

from msif.testing.gcs_emulator import main

sys.exit(main())
